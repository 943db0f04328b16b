"""Triton building blocks shared by the bf16/fp16 and FP8 HSTU attention kernels.

* The two mask rules of :mod:`torchrec_hstu.ops.masks` evaluated per tile from lengths
  (:func:`valid_mask`), never from a dense mask.
* Which key tiles a query block must visit (:func:`fwd_tile_ranges`) and which query tiles a
  key block must visit (:func:`bwd_tile_ranges`). Both return a masked range ``A`` and a range
  ``B`` split into ``masked | interior (provably all valid, no mask) | masked``; tiles outside
  the ranges are fully masked and skipped. That is what makes causal attention cost about half
  and windowed attention cost in proportion to the window.
* ``silu`` through ``tanh.approx.f32`` (one special-function op per score instead of two).

Mask modes (``MASK_MODE`` constexpr):

* ``MASK_PLAIN_CAUSAL``: causal, no targets, no contextual prefix, no window: ``j <= i``.
* ``MASK_GR_CAUSAL``: the generative-recommenders id rule, causal, every feature at run time.
* ``MASK_GR_FULL``: the same rule, non-causal.
* ``MASK_SLA``: Semi-Local Attention (``sla_k1`` / ``sla_k2``).
* ``MASK_PLAIN_FULL``: non-causal, no targets, no contextual prefix, no window: all keys.

The id rule (see :func:`torchrec_hstu.ops.masks.hstu_attention_mask`) is evaluated with
``id(p) = min(max(p - c + 1, 0), maxid)`` and ``maxid = n - c + 1 - T`` also when ``c == 0``:
that shifts every id by one, which none of the rules (differences, ``id >= maxid - M``,
``id == 0`` only reachable when ``c > 0``) can see.
"""

import os

import triton
import triton.language as tl

MASK_PLAIN_CAUSAL = 0
MASK_GR_CAUSAL = 1
MASK_GR_FULL = 2
MASK_SLA = 3
MASK_PLAIN_FULL = 4


def ceil_div(x: int, y: int) -> int:
    """``ceil(x / y)`` for host-side grids. Triton's ``triton.cdiv`` and
    ``triton.next_power_of_2`` are ``constexpr_function`` wrappers that unwrap their arguments on
    every host call (about 5 us each on a CPU core, nine of them per eager forward+backward)."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), for host-side block sizes (see
    :func:`ceil_div`)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mask_mode(causal: bool, use_sla: bool, has_targets: bool, contextual_seq_len: int,
              max_attn_len: int) -> int:
    """The ``MASK_MODE`` constexpr for one call's options."""
    if use_sla:
        return MASK_SLA
    if not causal:
        plain = not has_targets and contextual_seq_len == 0 and max_attn_len == 0
        return MASK_PLAIN_FULL if plain else MASK_GR_FULL
    if not has_targets and contextual_seq_len == 0 and max_attn_len == 0:
        return MASK_PLAIN_CAUSAL
    return MASK_GR_CAUSAL


@triton.jit
def tanh_approx(x):
    """``tanh`` by the ``tanh.approx.f32`` instruction (max relative error about 2^-11)."""
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def silu_and_sigmoid(s, half_alpha, FAST: tl.constexpr):
    """For scores ``s`` return ``(silu(x), sigmoid(x))`` with ``x = alpha * s``.

    ``silu(x) = x * sigmoid(x)`` and ``sigmoid(x) = (1 + tanh(x / 2)) / 2``, so with
    ``h = x / 2`` and ``t = tanh(h)``: ``silu = h + h * t``, ``sigmoid = 0.5 + 0.5 * t``.
    """
    h = s * half_alpha
    if FAST:
        t = tanh_approx(h)
        sig = 0.5 + 0.5 * t
        p = h + h * t
    else:
        sig = tl.sigmoid(2.0 * h)
        p = 2.0 * h * sig
    return p, sig


@triton.jit
def silu_scaled(s, half_alpha, half_alpha_scale, FAST: tl.constexpr):
    """``silu(alpha * s) * scale`` with ``half_alpha_scale = alpha * scale / 2``."""
    if FAST:
        a = s * half_alpha_scale
        t = tanh_approx(s * half_alpha)
        p = a + a * t
    else:
        p = (2.0 * half_alpha_scale) * s * tl.sigmoid(2.0 * half_alpha * s)
    return p


@triton.jit
def gr_id(pos, c, maxid):
    """Id of position ``pos`` under the generative-recommenders rule."""
    return tl.minimum(tl.maximum(pos - c + 1, 0), maxid)


@triton.jit
def valid_mask(rows, cols, n, T, c, W, M, sla_k1, K2, MASK_MODE: tl.constexpr):
    """Boolean validity of (query ``rows``, key ``cols``) pairs; shapes broadcast.

    Args:
        rows: query positions in the sequence (e.g. ``[BM, 1]``).
        cols: key positions (e.g. ``[1, BN]``).
        n: sequence length.
        T: number of targets of the sequence (0 without targets).
        c: contextual prefix length.
        W: ``max_attn_len`` (0: no window).
        M: ``min_full_attn_seq_len``.
        sla_k1: SLA local window.
        K2: SLA global prefix ``max(sla_k2, c)``.
    """
    col_in = cols < n
    if MASK_MODE == 0:
        valid = (cols <= rows) & col_in
    elif MASK_MODE == 4:
        valid = col_in & (rows >= 0)
    elif MASK_MODE == 3:
        hist_end = tl.maximum(n - T, 0)
        hist_rule = (cols <= rows) & ((cols < K2) | (cols >= rows - sla_k1 + 1))
        valid = tl.where(rows >= hist_end, cols < hist_end, hist_rule) & col_in
    else:
        maxid = n - c + 1 - T
        rid = gr_id(rows, c, maxid)
        cid = gr_id(cols, c, maxid)
        if MASK_MODE == 1:
            dist = rid - cid
            valid = (rows == cols) | (dist > 0)
        else:
            dist = tl.abs(rid - cid)
            valid = (rows == cols) | (dist != 0)
        row_free = (W == 0) | ((M > 0) & (rid >= maxid - M))
        valid = valid & ((dist <= W) | row_free) & col_in
        valid = valid | ((rid == 0) & (cid < maxid))
    return valid


@triton.jit
def _align_down(x, B: tl.constexpr):
    return (x // B) * B


@triton.jit
def _align_up(x, B: tl.constexpr):
    return ((x + B - 1) // B) * B


@triton.jit
def fwd_tile_ranges(m0, n, T, c, W, M, sla_k1, K2, MASK_MODE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles the query block ``[m0, m0 + BLOCK_M)`` must visit.

    Returns ``(ta0, ta1, tb0, ti0, ti1, tb1)``, all multiples of ``BLOCK_N``: masked tiles
    ``[ta0, ta1)`` and ``[tb0, ti0)`` and ``[ti1, tb1)``, unmasked tiles ``[ti0, ti1)``; every
    key outside them is masked for every row of the block.
    """
    m1e = tl.minimum(m0 + BLOCK_M, n)
    ta0 = 0
    ta1 = 0
    if MASK_MODE == 0:
        tb0 = 0
        tb1 = _align_up(m1e, BLOCK_N)
        ti0 = 0
        ti1 = _align_down(m0, BLOCK_N)
    elif MASK_MODE == 1:
        maxid = n - c + 1 - T
        hi = tl.where(m0 < c, n, m1e)
        x = gr_id(m0, c, maxid) - W
        lo = tl.where(x <= 0, 0, x + c - 1)
        full_rows = (m0 < c) | (W == 0) | ((M > 0) & (gr_id(m1e - 1, c, maxid) >= maxid - M))
        lo = tl.where(full_rows, 0, lo)
        tb0 = _align_down(lo, BLOCK_N)
        tb1 = _align_up(hi, BLOCK_N)
        # Rows that are all history (no contextual row, no target row): keys before m0 and
        # within the window of the last row are valid for every row.
        history_block = (m0 >= c) & (m1e <= n - T)
        ti1 = tl.where(history_block, _align_down(m0, BLOCK_N), tb1)
        ti0 = tl.where(W == 0, tb0, _align_up(tl.maximum(m1e - 1 - W, 0), BLOCK_N))
        ti0 = tl.where(history_block, ti0, tb1)
        ti0 = tl.minimum(tl.maximum(ti0, tb0), tb1)
        ti1 = tl.minimum(tl.maximum(ti1, ti0), tb1)
    elif MASK_MODE == 2:
        tb0 = 0
        tb1 = _align_up(n, BLOCK_N)
        ti0 = tb1
        ti1 = tb1
    elif MASK_MODE == 4:
        tb0 = 0
        ti0 = 0
        ti1 = _align_down(n, BLOCK_N)
        tb1 = _align_up(n, BLOCK_N)
    else:
        hist_end = tl.maximum(n - T, 0)
        has_target_rows = m1e > hist_end
        ta1 = tl.where(has_target_rows, _align_up(m1e, BLOCK_N),
                       _align_up(tl.minimum(K2, m1e), BLOCK_N))
        lo = tl.maximum(m0 - sla_k1 + 1, 0)
        tb0 = tl.where(has_target_rows, ta1, tl.maximum(_align_down(lo, BLOCK_N), ta1))
        tb1 = tl.where(has_target_rows, ta1, tl.maximum(_align_up(m1e, BLOCK_N), tb0))
        ti0 = tb1
        ti1 = tb1
    return ta0, ta1, tb0, ti0, ti1, tb1


@triton.jit
def bwd_tile_ranges(n0, n, T, c, W, M, sla_k1, K2, MASK_MODE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles that can see the key block ``[n0, n0 + BLOCK_N)``.

    Returns ``(ta0, ta1, tb0, ti0, ti1, tb1)``, multiples of ``BLOCK_M``, with the meaning of
    :func:`fwd_tile_ranges`. Interior query tiles lie wholly inside the sequence (their loads
    need no row mask).
    """
    n1e = tl.minimum(n0 + BLOCK_N, n)
    ta0 = 0
    ta1 = 0
    if MASK_MODE == 0:
        tb0 = _align_down(n0, BLOCK_M)
        tb1 = _align_up(n, BLOCK_M)
        ti0 = _align_up(n1e - 1, BLOCK_M)
        ti1 = _align_down(n, BLOCK_M)
        ti0 = tl.minimum(tl.maximum(ti0, tb0), tb1)
        ti1 = tl.minimum(tl.maximum(ti1, ti0), tb1)
    elif MASK_MODE == 1:
        maxid = n - c + 1 - T
        # Contextual rows before the block see every non-target key.
        ta1 = _align_up(tl.minimum(c, n0), BLOCK_M)
        x = gr_id(n1e - 1, c, maxid) + W
        hi = tl.where((W == 0) | (M > 0) | (x >= maxid), n, tl.minimum(n, x + c))
        tb0 = tl.maximum(_align_down(n0, BLOCK_M), ta1)
        tb1 = tl.maximum(_align_up(hi, BLOCK_M), tb0)
        ti0 = _align_up(tl.maximum(n1e - 1, c), BLOCK_M)
        ti1 = _align_down(n - T, BLOCK_M)
        ti1 = tl.where(W == 0, ti1, tl.minimum(ti1, _align_down(n0 + W + 1, BLOCK_M)))
        ti0 = tl.minimum(tl.maximum(ti0, tb0), tb1)
        ti1 = tl.minimum(tl.maximum(ti1, ti0), tb1)
    elif MASK_MODE == 2:
        tb0 = 0
        tb1 = _align_up(n, BLOCK_M)
        ti0 = tb1
        ti1 = tb1
    elif MASK_MODE == 4:
        # Keys past n (a partial last block) are zero-filled: they contribute nothing.
        tb0 = 0
        ti0 = 0
        ti1 = _align_down(n, BLOCK_M)
        tb1 = _align_up(n, BLOCK_M)
    else:
        hist_end = tl.maximum(n - T, 0)
        a_hi = tl.where(n0 < K2, hist_end, tl.minimum(n1e - 1 + sla_k1, hist_end))
        ta0 = _align_down(n0, BLOCK_M)
        ta1 = tl.where(a_hi > n0, _align_up(a_hi, BLOCK_M), ta0)
        tb0 = tl.maximum(_align_down(hist_end, BLOCK_M), ta1)
        tb1 = tl.where(n0 < hist_end, _align_up(n, BLOCK_M), tb0)
        tb1 = tl.maximum(tb1, tb0)
        ti0 = tb1
        ti1 = tb1
    return ta0, ta1, tb0, ti0, ti1, tb1


@triton.jit
def tile_segment(SEGMENT: tl.constexpr, ta0, ta1, tb0, ti0, ti1, tb1):
    """Bounds ``(lo, hi)`` of one of the four tile ranges of :func:`fwd_tile_ranges` and
    :func:`bwd_tile_ranges`, in order: 0 the masked range ``A``, 1 the masked head of ``B``, 2
    its interior (no mask), 3 its masked tail. Kernels walk them with ``tl.static_range(4)``, so
    each segment compiles to its own loop and ``SEGMENT != 2`` is the tile's ``MASKED``."""
    if SEGMENT == 0:
        lo = ta0
        hi = ta1
    elif SEGMENT == 1:
        lo = tb0
        hi = ti0
    elif SEGMENT == 2:
        lo = ti0
        hi = ti1
    else:
        lo = ti1
        hi = tb1
    return lo, hi


@triton.jit
def seq_span(offsets, b):
    """``(start, length)`` of jagged row ``b`` of ``offsets``: the start as int64 (it scales
    strides into pointer offsets), the length as int32."""
    start = tl.load(offsets + b).to(tl.int64)
    length = (tl.load(offsets + b + 1) - start).to(tl.int32)
    return start, length


@triton.jit
def seq_num_targets(num_targets, b, HAS_TARGETS: tl.constexpr):
    """Targets of sequence ``b`` (0 without ``num_targets``)."""
    if HAS_TARGETS:
        T = tl.load(num_targets + b).to(tl.int32)
    else:
        T = 0
    return T


@triton.jit
def to_e4m3_saturated(x, INTERPRET: tl.constexpr):
    """Saturating round-to-nearest-even cast of float32 ``x`` to float8_e4m3fn.

    On the GPU this is one ``cvt.rn.satfinite`` per pair. Triton 3.6's CPU interpreter rounds
    some values wrongly (e.g. 0.49 -> 0.25), so under ``INTERPRET`` the value is first rounded
    to the e4m3 grid in float32 arithmetic, which its cast then keeps exactly.
    """
    x = tl.clamp(x, -448.0, 448.0)
    if INTERPRET:
        ax = tl.abs(x)
        e = tl.floor(tl.log2(tl.maximum(ax, 1e-30)))
        e = tl.where(tl.exp2(e) > ax, e - 1.0, e)
        quantum = tl.exp2(tl.maximum(e, -6.0) - 3.0)
        r = x / quantum
        f = tl.floor(r)
        diff = r - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        up = (diff > 0.5) | ((diff == 0.5) & odd)
        x = (f + tl.where(up, 1.0, 0.0)) * quantum
    return x.to(tl.float8e4nv)
