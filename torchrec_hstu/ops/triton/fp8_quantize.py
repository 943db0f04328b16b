"""Fused Triton FP8 quantizers for ``fp8_quant_mode`` 0..5, bit-identical to the PyTorch ones.

The PyTorch quantizers (:mod:`torchrec_hstu.ops.fp8.quantize`) make several full fp32 passes
over each tensor (abs, amax, scatter, gather, divide, cast); at 65k tokens x 4 heads x 128 they
take 1.6-2.1 ms for q, k, v on an H100. These kernels read each tensor once where the group of
one descale fits in one program (modes 0, 1 row-wise and column-wise, 2) and twice otherwise
(modes 3, 4, 5: a group-amax pass with float atomics, then the quantize pass). Nothing is read
back to the host.

Symbols: ``B`` batch, ``L`` tokens, ``H`` heads, ``D`` head dim, ``N`` ``max_seq_len``.

Exactness. With ``exact=True`` every output (fp8 bytes, ``descale``, ``token_descale``,
``block_offsets``) equals :func:`~torchrec_hstu.ops.fp8.quantize.quantize_for_mode`'s bit for
bit, on the same device:

* ``x / descale`` is IEEE division (``div_rn``), as in PyTorch.
* ``descale = max(amax * fl32(1/448), 1e-6)`` on every device, as
  :func:`~torchrec_hstu.ops.fp8.quantize.descale_from_amax` computes it; the two-pass modes
  call that function directly.
* The fp32 -> float8_e4m3fn conversion rounds to nearest even like PyTorch's (c10's): on a GPU
  with the conversion instruction (compute capability >= 8.9) by ``cvt.rn.satfinite`` where no
  value can leave the fp8 range (modes 1..5 divide by ``amax / 448``) or where PyTorch
  saturates too; otherwise on integer bits with c10's algorithm (non-saturating: ``|x| > 464``
  and NaN give NaN, as older ``tensor.to(torch.float8_e4m3fn)`` does), so mode 0's plain cast
  matches too, and the Triton interpreter's own cast is never used.

The default (``exact=False``) multiplies by the correctly rounded ``1 / descale`` instead of
dividing: one multiply per element where a division costs a dozen instructions, which is what
bounds these kernels (H200, 2026-12-03: mode 2 1.72 -> 2.14 TB/s). The product can differ from
the quotient in the last fp32 bit, which moves an fp8 value by one step only at a rounding tie
(1 byte in 33.5M in that run); descales and offsets stay identical. The FP8 attention's
``"precise"`` and ``"mixed"`` accumulations use ``exact=True`` (bit-level agreement with the
emulation; only ``"fast"`` takes the reciprocal).

Example::

    >>> x = torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16)
    >>> offsets = torch.tensor([0, 100, 300], device="cuda")
    >>> quant = triton_quantize_for_mode(x, offsets, 2, block_size=128, max_seq_len=200)
    >>> quant.values.dtype, quant.descale.shape
    (torch.float8_e4m3fn, torch.Size([3, 2]))
"""

from typing import Any, Dict, Optional

import torch
import triton
import triton.language as tl

from torchrec_hstu.ops.fp8.arch import TRITON_FP8_MIN_CAPABILITY
from torchrec_hstu.ops.fp8.quantize import (
    COLWISE_CHUNK,
    FP8_DTYPE,
    SCALE_EPS,
    FP8Quantized,
    descale_from_amax,
    sequence_block_offsets,
)
from torchrec_hstu.ops.triton._common import ceil_div, interpret_mode, next_power_of_2

#: Tokens x heads rows per program of the row kernels (modes 0, 1 row-wise, 5).
_ROWS = 32
#: Tokens per program of the per-sample amax / quantize passes (modes 3, 4).
_SEQ_TILE = 64
#: Tokens per piece of mode 1's column-wise kernel (``SUB_T``).
_COLWISE_PIECE = 64


@triton.jit
def _e4m3_bits(y, SATURATE: tl.constexpr):
    """float32 ``y`` -> float8_e4m3fn bits (int32 in [0, 255]) exactly as PyTorch converts.

    c10's algorithm: round to nearest even; values below 2^-6 go through the denormal path (an
    fp32 add of 2^14 does the rounding). Out of range (``|y| > 464`` after rounding, inf):
    ``+-448`` if ``SATURATE`` (what recent PyTorch does), else NaN (0x7F with the sign bit, the
    older c10 code). NaN stays NaN.
    """
    bits = y.to(tl.int32, bitcast=True)
    negative = bits < 0
    a = bits & 0x7FFFFFFF
    den = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    odd = (a >> 20) & 1
    nor = (a - (120 << 23) + 0x7FFFF + odd) >> 20
    if SATURATE:
        nor = tl.minimum(nor, 0x7E)
        big = tl.where(a > 0x7F800000, 0x7F, 0x7E)
    else:
        big = 0x7F
    r = tl.where(a >= (1087 << 20), big, tl.where(a < (121 << 23), den, nor))
    return r | tl.where(negative, 0x80, 0)


@triton.jit
def _descale(amax):
    """``max(amax * fl32(1/448), 1e-6)``: :func:`descale_from_amax`'s arithmetic."""
    return tl.maximum(amax * (1.0 / 448.0), 1e-6)


@triton.jit
def _fp8_bytes(y, SATURATE: tl.constexpr, HW_CAST: tl.constexpr):
    """float32 ``y`` -> float8_e4m3fn bytes (uint8). ``HW_CAST``: the GPU's
    ``cvt.rn.satfinite.e4m3x2.f32`` (one instruction per pair; round to nearest even like c10,
    saturating out-of-range values, so it is only used where none can occur or where PyTorch
    saturates too); else the integer emulation :func:`_e4m3_bits`."""
    if HW_CAST:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return _e4m3_bits(y, SATURATE).to(tl.uint8)


@triton.jit
def _scaled(x, d, RECIP: tl.constexpr):
    """``x / d`` (``d`` broadcastable to ``x``): IEEE division, or with ``RECIP`` ``x`` times
    the correctly rounded ``1 / d`` (one multiply per element instead of a division; may differ
    from ``x / d`` in the last fp32 bit, which moves an fp8 value only at a rounding tie)."""
    if RECIP:
        return x * tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d)
    return tl.math.div_rn(x, tl.broadcast_to(d, x.shape))


@triton.jit
def _rows_kernel(
    X, OUT, DESC, TOK_DESC, AMAX,
    R, H, stride_xt, stride_xh, D,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, MODE: tl.constexpr,
    SATURATE: tl.constexpr, HW_CAST: tl.constexpr, RECIP: tl.constexpr,
):
    """Flat over ``R = L * H`` rows (token, head). MODE 0: plain cast; 1: per-row descale
    (written to ``DESC [R]``); 5: the descale ``DESC[0]``; -5: amax pass of mode 5 (atomic max
    into ``AMAX[0]``, nothing else written)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = rows < R
    io_mask = row_in[:, None] & (offs_d[None, :] < D)
    t = rows // H
    h = rows % H
    x = tl.load(X + t[:, None] * stride_xt + h[:, None] * stride_xh + offs_d[None, :],
                mask=io_mask, other=0.0).to(tl.float32)
    if MODE == -5:
        tl.atomic_max(AMAX, tl.max(tl.max(tl.abs(x), axis=1), axis=0), sem="relaxed")
        return
    if MODE == 0:
        y = x
    elif MODE == 1:
        d = _descale(tl.max(tl.abs(x), axis=1))
        tl.store(DESC + rows, d, mask=row_in)
        y = _scaled(x, d[:, None], RECIP)
    else:
        y = _scaled(x, tl.load(DESC + tl.zeros((1, 1), tl.int32)), RECIP)
    tl.store(OUT + rows[:, None] * D + offs_d[None, :], _fp8_bytes(y, SATURATE, HW_CAST), mask=io_mask)


@triton.jit
def _load_tokens(X, start, t_first, n, h, stride_xt, stride_xh, D,
                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens ``[t_first, t_first + ROWS)`` of one sequence (``start``, ``n`` tokens), head
    ``h``, as float32 ``[ROWS, BLOCK_D]`` (zeros past the sequence and past ``D``)."""
    offs_t = t_first + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < n)[:, None] & (offs_d < D)[None, :]
    ptrs = X + (start + offs_t)[:, None] * stride_xt + h * stride_xh + offs_d[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tokens(OUT, TOK_DESC, x, d, start, t_first, n, h, H, D,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
                  SATURATE: tl.constexpr, HW_CAST: tl.constexpr, RECIP: tl.constexpr):
    """Quantize ``x`` (:func:`_load_tokens`' rows) with the descale ``d`` and write the fp8
    bytes and the per-token descales: a scalar ``d`` gives ``TOK_DESC [L, H]`` (mode 4: ``[L]``,
    written by head 0); mode 6's per-column ``d [BLOCK_D]`` gives ``TOK_DESC [L, H, D]``."""
    offs_t = t_first + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    tok_in = offs_t < n
    io_mask = tok_in[:, None] & (offs_d < D)[None, :]
    tokens = start + offs_t
    if MODE == 6:
        d_full = tl.broadcast_to(d[None, :], (ROWS, BLOCK_D))
        tl.store(TOK_DESC + (tokens[:, None] * H + h) * D + offs_d[None, :], d_full, mask=io_mask)
        y = _scaled(x, d[None, :], RECIP)
    else:
        d_tok = tl.zeros((ROWS,), tl.float32) + d
        if MODE == 4:
            if h == 0:
                tl.store(TOK_DESC + tokens, d_tok, mask=tok_in)
        else:
            tl.store(TOK_DESC + tokens * H + h, d_tok, mask=tok_in)
        y = _scaled(x, d_tok[:, None], RECIP)
    tl.store(OUT + (tokens[:, None] * H + h) * D + offs_d[None, :], _fp8_bytes(y, SATURATE, HW_CAST),
             mask=io_mask)


@triton.jit
def _tile_amax(x, MODE: tl.constexpr):
    """Mode 6: the column-wise amax ``[BLOCK_D]``; other modes: the tile's amax."""
    if MODE == 6:
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    return amax


@triton.jit
def _seq_kernel(
    X, OUT, DESC, TOK_DESC, BLOCK_OFFSETS, AMAX, seq_offsets,
    H, stride_xt, stride_xh, D,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, MODE: tl.constexpr,
    SATURATE: tl.constexpr, HW_CAST: tl.constexpr, RECIP: tl.constexpr, SUB_T: tl.constexpr,
):
    """One program per (sequence-aligned block of ``BLOCK_T`` tokens, sequence ``b``, head).

    MODE 2: per-(block, head) descale -> ``DESC [NB, H]``, ``TOK_DESC [L, H]``.
    MODE 6: mode 1 column-wise: per-(block, head, d) descale -> ``DESC [NB, H, D]``,
    ``TOK_DESC [L, H, D]``. MODE 3 / 4: quantize with ``DESC [B, H]`` / ``DESC [B]``,
    write ``TOK_DESC [L, H]`` / ``[L]``. MODE -3 / -4: amax passes (atomic max into ``AMAX``).
    ``SUB_T < BLOCK_T``: the block is walked in ``SUB_T``-token pieces (fewer registers per
    program: a whole 128 x 128 fp32 tile spills); modes 2 and 6 then read each piece twice (the
    block's amax, then the quantize pass), the second time from L2.
    """
    pid_bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start = tl.load(seq_offsets + b).to(tl.int64)
    n = (tl.load(seq_offsets + b + 1) - start).to(tl.int32)
    t0 = blk * BLOCK_T
    if t0 >= n:
        return
    if SUB_T >= BLOCK_T:
        x = _load_tokens(X, start, t0, n, h, stride_xt, stride_xh, D, BLOCK_T, BLOCK_D)
        amax = _tile_amax(x, MODE)
    elif MODE < 0 or MODE == 2 or MODE == 6:
        if MODE == 6:
            amax = tl.zeros((BLOCK_D,), tl.float32)
        else:
            amax = 0.0
        # A run-time loop: unrolled, the compiler keeps the pieces live for the quantize pass.
        for s in range(0, BLOCK_T, SUB_T):
            piece = _load_tokens(X, start, t0 + s, n, h, stride_xt, stride_xh, D, SUB_T, BLOCK_D)
            amax = tl.maximum(amax, _tile_amax(piece, MODE))
    if MODE < 0:
        if MODE == -3:
            tl.atomic_max(AMAX + b * H + h, amax, sem="relaxed")
        else:
            tl.atomic_max(AMAX + b, amax, sem="relaxed")
        return
    if MODE == 6:
        d = _descale(amax)
        offs_d = tl.arange(0, BLOCK_D)
        row = tl.load(BLOCK_OFFSETS + b) + blk
        tl.store(DESC + (row * H + h) * D + offs_d, d, mask=offs_d < D)
    elif MODE == 2:
        d = _descale(amax)
        row = tl.load(BLOCK_OFFSETS + b) + blk
        tl.store(DESC + row * H + h, d)
    elif MODE == 3:
        d = tl.load(DESC + b * H + h)
    else:
        d = tl.load(DESC + b)
    if SUB_T >= BLOCK_T:
        _store_tokens(OUT, TOK_DESC, x, d, start, t0, n, h, H, D, BLOCK_T, BLOCK_D, MODE,
                      SATURATE, HW_CAST, RECIP)
    else:
        for s in range(0, BLOCK_T, SUB_T):
            piece = _load_tokens(X, start, t0 + s, n, h, stride_xt, stride_xh, D, SUB_T, BLOCK_D)
            _store_tokens(OUT, TOK_DESC, piece, d, start, t0 + s, n, h, H, D, SUB_T, BLOCK_D,
                          MODE, SATURATE, HW_CAST, RECIP)


_SATURATES: Dict[str, bool] = {}


def torch_cast_saturates(device: torch.device) -> bool:
    """Whether ``tensor.to(float8_e4m3fn)`` on ``device`` saturates out-of-range values to
    +-448 (recent PyTorch) or makes them NaN (older c10 code). Probed once per device type
    (one tiny host read the first time), then cached."""
    key = device.type
    if key not in _SATURATES:
        probe = torch.tensor([470.0, float("inf")], device=device).to(FP8_DTYPE)
        bits = probe.view(torch.uint8).cpu().tolist()
        if bits not in ([0x7E, 0x7E], [0x7F, 0x7F]):
            raise RuntimeError(f"unexpected float8_e4m3fn cast of [470, inf] on {device}: {bits}")
        _SATURATES[key] = bits == [0x7E, 0x7E]
    return _SATURATES[key]


_HARDWARE_CAST: Dict[int, bool] = {}


def hardware_fp8_cast(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use the GPU's fp32 -> e4m3 conversion instruction
    (the Triton FP8 gate's compute capability, 8.9 or newer; never under Triton's CPU interpreter, whose cast
    rounds some values wrongly). Cached per CUDA device index."""
    if device.type != "cuda" or interpret_mode():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HARDWARE_CAST:
        _HARDWARE_CAST[index] = torch.cuda.get_device_capability(index) >= TRITON_FP8_MIN_CAPABILITY
    return _HARDWARE_CAST[index]


def _check(x: torch.Tensor, seq_offsets: torch.Tensor, fp8_quant_mode: int,
           max_seq_len: Optional[int]) -> None:
    if x.dim() != 3 or x.shape[2] == 0:
        raise ValueError(f"x must be a jagged [L, H, D] tensor with D >= 1; got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32; got {x.dtype}")
    if x.stride(2) != 1:
        raise ValueError(f"x must have a contiguous last dim (stride 1); got strides {x.stride()}")
    if fp8_quant_mode not in range(6) or isinstance(fp8_quant_mode, bool):
        raise ValueError(f"fp8_quant_mode must be an int in [0, 5]; got {fp8_quant_mode!r}")
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.device != x.device:
        raise ValueError(
            f"seq_offsets must be a [B + 1] int tensor on {x.device}; got shape "
            f"{tuple(seq_offsets.shape)} on {seq_offsets.device}")
    if fp8_quant_mode in (1, 2, 3, 4) and (max_seq_len is None or max_seq_len < 0):
        raise ValueError(
            f"max_seq_len (>= every sequence length, a host int) is needed by mode "
            f"{fp8_quant_mode}; got {max_seq_len!r}")


def _warps(elements: int) -> int:
    return 4 if elements <= 8192 else 8


#: Benchmark-only launch overrides, empty in normal use: ``seq_warps``, ``rows_warps``,
#: ``rows`` (rows per program of the row kernels), ``sub_t`` (tokens per piece of the sequence
#: kernel), which leave the outputs as they are; ``hw_cast`` (False: the integer cast) and
#: ``recip`` (the reciprocal multiply whatever ``exact`` says), which measure those choices.
_TUNING: dict = {}


def triton_quantize_for_mode(
    x: torch.Tensor,
    seq_offsets: torch.Tensor,
    fp8_quant_mode: int,
    block_size: int,
    colwise: bool = False,
    chunk: int = COLWISE_CHUNK,
    max_seq_len: Optional[int] = None,
    exact: bool = False,
    block_offsets: Optional[torch.Tensor] = None,
) -> FP8Quantized:
    """Quantize one operand for ``fp8_quant_mode`` with fused Triton kernels.

    Same contract and outputs as :func:`torchrec_hstu.ops.fp8.quantize.quantize_for_mode`
    (bit-identical on the same device with ``exact=True``), plus ``max_seq_len``, which sizes
    the launch grid so that no length is read on the host.

    Args:
        x: ``[L, H, D]`` bf16 / fp16 / fp32 on CUDA (or CPU under ``TRITON_INTERPRET=1``), last
            dim contiguous.
        seq_offsets: ``[B + 1]`` int32 / int64 on ``x``'s device.
        fp8_quant_mode: 0..5.
        block_size: mode 2's block size for this operand (a kernel tile size).
        colwise: mode 1 only: the column-wise (``chunk`` tokens x 1) version.
        chunk: mode 1 column-wise token granularity.
        max_seq_len: ``N`` >= every sequence length (modes 1..4; a smaller value leaves tokens
            unquantized).
        exact: divide by the descale (bit-identical to the PyTorch quantizers) instead of
            multiplying by its reciprocal (faster; see the module docstring).
        block_offsets: modes 1 column-wise and 2: ``sequence_block_offsets(seq_offsets, tile)``
            for this call's tile (``chunk`` / ``block_size``), when the caller quantizes several
            operands of one batch with the same tile (it saves the small ops that compute
            them, host time in eager calls); computed here when None.

    Returns:
        :class:`~torchrec_hstu.ops.fp8.quantize.FP8Quantized`: ``values [L, H, D]``
        float8_e4m3fn, ``descale`` in the mode's layout, ``token_descale`` (``[L, H, 1]``;
        ``[L, H, D]`` column-wise), ``block_offsets [B + 1]`` for modes 1 column-wise and 2.

    Raises:
        ValueError: bad shapes, dtypes, mode, block sizes or a missing ``max_seq_len``.
    """
    mode = fp8_quant_mode
    if mode != 1:
        colwise = False
    _check(x, seq_offsets, mode, max_seq_len if (mode != 1 or colwise) else 0)
    if mode == 2 and (not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a positive power of two; got {block_size!r}")
    if colwise and (chunk <= 0 or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be a positive power of two; got {chunk!r}")
    total, heads, dim = x.shape
    batch = seq_offsets.numel() - 1
    device = x.device
    values = torch.empty((total, heads, dim), dtype=FP8_DTYPE, device=device)
    out = values.view(torch.uint8)
    block_d = next_power_of_2(dim)
    rows = total * heads
    block_r = _TUNING.get("rows") or _ROWS
    rows_grid = (ceil_div(rows, block_r),)
    fp32: Dict[str, Any] = dict(dtype=torch.float32, device=device)

    def cast_flags(kind: int) -> Dict[str, bool]:
        saturate = torch_cast_saturates(device)
        # Scaled modes put every finite value in [-448, 448] (|x| / (amax / 448)), where the
        # hardware conversion and PyTorch's agree bit for bit; mode 0 casts raw values, so it
        # takes the hardware path only where PyTorch saturates too.
        hw_cast = _TUNING.get("hw_cast", True) and hardware_fp8_cast(device) and (kind != 0 or saturate)
        return dict(SATURATE=saturate, HW_CAST=bool(hw_cast), RECIP=bool(_TUNING.get("recip", not exact)))

    def seq_launch(kind: int, tile: int, desc, tok_desc, block_offsets, amax) -> None:
        if rows == 0 or batch == 0 or max_seq_len == 0:
            return
        assert max_seq_len is not None  # _check refused a missing one for these modes
        grid = (batch * heads, ceil_div(max_seq_len, tile))
        # Mode 1 column-wise keeps a per-column amax and a [tile, D] descale tile live: walked
        # in 64-token pieces it stops spilling (H200, 2026-12-03: 1.95 -> 2.47 TB/s). The other
        # modes measured no faster in pieces, so they keep the whole tile in registers.
        sub_t = min(_TUNING.get("sub_t") or (_COLWISE_PIECE if kind == 6 else tile), tile)
        _seq_kernel[grid](
            x, out, desc, tok_desc, block_offsets, amax, seq_offsets,
            heads, x.stride(0), x.stride(1), dim,
            BLOCK_D=block_d, BLOCK_T=tile, MODE=kind, **cast_flags(kind),
            SUB_T=sub_t,
            num_warps=_TUNING.get("seq_warps") or _warps(sub_t * block_d),
        )

    def rows_launch(kind: int, desc, amax) -> None:
        if rows == 0:
            return
        _rows_kernel[rows_grid](
            x, out, desc, desc, amax, rows, heads, x.stride(0), x.stride(1), dim,
            BLOCK_D=block_d, BLOCK_R=block_r, MODE=kind, **cast_flags(kind),
            num_warps=_TUNING.get("rows_warps") or _warps(block_r * block_d),
        )

    if mode == 0:
        ones = torch.ones(1, **fp32)
        rows_launch(0, ones, ones)
        return FP8Quantized(values, ones, ones.expand(total, heads, 1))
    if mode == 1 and not colwise:
        descale = torch.empty((total, heads), **fp32)
        rows_launch(1, descale, descale)
        return FP8Quantized(values, descale, descale.unsqueeze(-1))
    if mode == 5:
        amax = torch.zeros(1, **fp32)
        rows_launch(-5, amax, amax)
        descale = descale_from_amax(amax)
        rows_launch(5, descale, amax)
        return FP8Quantized(values, descale, descale.view(1, 1, 1).expand(total, heads, 1))
    if mode in (1, 2):
        tile = chunk if colwise else block_size
        if block_offsets is None:
            block_offsets = sequence_block_offsets(seq_offsets, tile)
        elif block_offsets.shape != (batch + 1,) or block_offsets.device != device:
            raise ValueError(
                f"block_offsets must be a [B + 1] = [{batch + 1}] tensor on {device} "
                f"(sequence_block_offsets(seq_offsets, {tile})); got shape "
                f"{tuple(block_offsets.shape)} on {block_offsets.device}")
        bound = (total + batch * (tile - 1)) // tile
        shape = (bound, heads, dim) if colwise else (bound, heads)
        descale = torch.full(shape, SCALE_EPS, **fp32)
        token_descale = torch.empty((total, heads, dim if colwise else 1), **fp32)
        seq_launch(6 if colwise else 2, tile, descale, token_descale, block_offsets, descale)
        return FP8Quantized(values, descale, token_descale, block_offsets)
    # Modes 3 and 4: amax per (sequence, head) / sequence, then quantize.
    amax = torch.zeros((batch, heads) if mode == 3 else (batch,), **fp32)
    seq_launch(-mode, _SEQ_TILE, amax, amax, seq_offsets, amax)
    descale = descale_from_amax(amax)
    if mode == 3:
        token_descale = torch.empty((total, heads, 1), **fp32)
    else:
        token_descale = torch.empty((total,), **fp32).view(-1, 1, 1).expand(total, heads, 1)
    seq_launch(mode, _SEQ_TILE, descale, token_descale, seq_offsets, amax)
    return FP8Quantized(values, descale, token_descale)


__all__ = ["triton_quantize_for_mode", "torch_cast_saturates", "hardware_fp8_cast"]
