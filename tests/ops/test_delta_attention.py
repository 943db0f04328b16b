"""Delta (KV-cached) HSTU attention against oracles written in the tests.

* High precision: the last ``d_b`` rows of the dense per-sequence oracle of
  ``tests/strategies.py`` (float64, mask rules written out pair by pair), every mask option.
* FP8 mode 0 (no scales): rows of the full FP8 emulation (an independent implementation).
* FP8 modes 1..5: (a) when every prefix ``n_b - d_b`` is a multiple of the q block / P-row
  group, the full emulation with the prefix queries zeroed has the same quantization groups as
  the delta rule, so its delta rows must match exactly; (b) any alignment: a per-sequence,
  per-tile loop of the "delta-q" rule (anchor-cutlass-fp8.md section 7) written here.
* Triton kernels: in Triton's CPU interpreter (subprocess) against the PyTorch paths, and on
  the device (``gpu`` marker).
"""

import math
import os
from typing import List, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ops.test_fp8_emulation import oracle_fp8_forward_head, oracle_quantize
from tests.ops.triton_interpreter import run_in_interpreter
from tests.strategies import gr_mask_rule, jagged_batches, oracle_attention, sla_mask_rule
from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.delta_attention import delta_hstu_attention, delta_hstu_mha
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
from torchrec_hstu.ops.fp8.quantize import FP8TileSizes
from torchrec_hstu.ops.pytorch.delta_attention import fp8_delta_hstu_attention_emulated


# ----------------------------------------------------------------------------- helpers
def offsets_of(lengths: List[int]) -> torch.Tensor:
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)


def delta_rows(lengths: List[int], deltas: List[int]) -> torch.Tensor:
    """Indices (into the full jagged tensor) of the last ``d_b`` tokens of each sequence."""
    starts = offsets_of(lengths)
    return torch.cat(
        [torch.arange(int(starts[b + 1]) - d, int(starts[b + 1]), dtype=torch.int64) for b, d in enumerate(deltas)]
        + [torch.zeros(0, dtype=torch.int64)]
    )


def mask_fn_for(options: AttentionOptions, targets: Optional[List[int]]):
    def mask_fn(b: int, n: int):
        t = None if targets is None else targets[b]
        if options.use_sla:
            return sla_mask_rule(n, t, options.contextual_seq_len, options.sla_k1, options.sla_k2)
        return gr_mask_rule(
            n, t, options.contextual_seq_len, options.max_attn_len, options.min_full_attn_seq_len, options.causal
        )

    return mask_fn


def random_qkv(total: int, heads: int, dqk: int, dv: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(total, heads, dqk, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(total, heads, dv, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


@st.composite
def delta_cases(draw):
    """A jagged batch, per-sequence delta lengths and mask options (every option family)."""
    batch = draw(jagged_batches(max_batch=4, max_len=20))
    deltas = [draw(st.integers(0, n)) for n in batch.lengths]
    family = draw(st.sampled_from(["gr", "window", "sla", "noncausal"]))
    c = batch.contextual_seq_len
    if family == "sla":
        options = AttentionOptions(contextual_seq_len=c, sla_k1=draw(st.integers(0, 5)), sla_k2=draw(st.integers(1, 5)))
    elif family == "window":
        options = AttentionOptions(
            contextual_seq_len=c, max_attn_len=draw(st.integers(1, 6)), min_full_attn_seq_len=draw(st.integers(0, 3))
        )
    else:
        options = AttentionOptions(causal=family == "gr", contextual_seq_len=c)
    scaling = draw(st.sampled_from([-1, 7]))
    options = AttentionOptions(**{**options.__dict__, "scaling_seqlen": scaling})
    return batch, deltas, options


# ----------------------------------------------------------------------------- high precision
@given(case=delta_cases(), heads=st.integers(1, 2), seed=st.integers(0, 2**16))
@settings(max_examples=40)
def test_delta_rows_equal_full_oracle_float64(case, heads, seed):
    batch, deltas, options = case
    q, k, v = random_qkv(batch.total_len, heads, 4, 3, seed=seed)
    alpha = 0.7
    divisor = batch.max_seq_len if options.scaling_seqlen == -1 else options.scaling_seqlen
    full = oracle_attention(q, k, v, batch.lengths, alpha, divisor, mask_fn_for(options, batch.num_targets))
    rows = delta_rows(batch.lengths, deltas)
    out = delta_hstu_attention(
        q[rows], k, v, batch.seq_offsets, batch.max_seq_len, alpha, options,
        num_targets=batch.num_targets_tensor(), delta_offsets=offsets_of(deltas),
    )
    assert out.dtype == torch.float64 and out.shape == (rows.numel(), heads, 3)
    torch.testing.assert_close(out, full[rows], rtol=1e-12, atol=1e-12)


def test_uniform_delta_and_gr_signature():
    lengths, delta = [9, 4, 12], 3
    targets = torch.tensor([2, 3, 1])
    q, k, v = random_qkv(sum(lengths), 2, 8, 8)
    rows = delta_rows(lengths, [delta] * 3)
    options = AttentionOptions(max_attn_len=4, contextual_seq_len=1)
    full = oracle_attention(q, k, v, lengths, 0.4, 12, mask_fn_for(options, targets.tolist()))
    out = delta_hstu_mha(12, 0.4, q[rows], k, v, offsets_of(lengths), num_targets=targets, max_attn_len=4,
                         contextual_seq_len=1)
    torch.testing.assert_close(out, full[rows], rtol=1e-12, atol=1e-12)


def test_gradients_match_oracle():
    lengths, deltas = [7, 0, 10], [2, 0, 4]
    targets = [2, 0, 3]
    q, k, v = random_qkv(sum(lengths), 2, 4, 5, seed=3)
    rows = delta_rows(lengths, deltas)
    dout = torch.randn(rows.numel(), 2, 5, dtype=torch.float64)
    options = AttentionOptions()
    leaves = [x.clone().requires_grad_() for x in (q[rows], k, v)]
    out = delta_hstu_attention(*leaves, offsets_of(lengths), 10, 0.5, options, torch.tensor(targets),
                               delta_offsets=offsets_of(deltas))
    got = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    full = oracle_attention(*ref_leaves, lengths, 0.5, 10, mask_fn_for(options, targets))
    want = torch.autograd.grad(full[rows], ref_leaves, dout)
    torch.testing.assert_close(got[0], want[0][rows], rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_inputs_computed_in_float32(dtype):
    lengths, deltas = [30, 11], [5, 11]
    q, k, v = random_qkv(sum(lengths), 2, 16, 16, dtype=dtype, seed=1)
    rows = delta_rows(lengths, deltas)
    out = delta_hstu_attention(q[rows], k, v, offsets_of(lengths), 30, 0.25, delta_offsets=offsets_of(deltas))
    assert out.dtype == dtype
    full = oracle_attention(q.double(), k.double(), v.double(), lengths, 0.25, 30, mask_fn_for(AttentionOptions(), None))
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(out.double(), full[rows], rtol=tol, atol=tol * float(full.abs().max()))


# ----------------------------------------------------------------------------- FP8
SMALL_TILES = FP8TileSizes(fwd_block_m=8, fwd_block_n=8, fwd_p_rows=4, bwd_block_m=8, bwd_block_n=8, colwise_chunk=16)


def loop_oracle_fp8_delta(
    delta_q, k, v, lengths, deltas, max_seq_len, alpha, options, targets, tiles: FP8TileSizes
) -> torch.Tensor:
    """The delta-q rule by explicit loops: delta q quantized over the delta rows, k/v over the
    full sequences; P scaled per ``fwd_p_rows`` delta rows (from the first delta row) x
    ``fwd_block_n`` keys (from key 0)."""
    mode = options.fp8_quant_mode
    chunk = tiles.colwise_chunk
    fq, fqd = oracle_quantize(delta_q, deltas, mode, tiles.fwd_block_m, False, chunk)
    fk, fkd = oracle_quantize(k, lengths, mode, tiles.fwd_block_n, False, chunk)
    fv, fvd = oracle_quantize(v, lengths, mode, tiles.fwd_block_n, True, chunk)
    scaling = options.resolve_scaling_seqlen(max_seq_len)
    out = torch.zeros(delta_q.shape[0], delta_q.shape[1], v.shape[2])
    k_start, q_start = 0, 0
    for b, (n, d) in enumerate(zip(lengths, deltas)):
        keys, queries = slice(k_start, k_start + n), slice(q_start, q_start + d)
        k_start, q_start = k_start + n, q_start + d
        if d == 0:
            continue
        full_mask = torch.tensor(mask_fn_for(options, targets)(b, n), dtype=torch.bool)
        mask = full_mask[n - d :]
        for h in range(delta_q.shape[1]):
            o = oracle_fp8_forward_head(
                fq[queries, h], fk[keys, h], fv[keys, h], fqd[queries, h, 0], fkd[keys, h, 0], fvd[keys, h],
                mask, alpha, mode, tiles,
            )
            out[queries, h] = o / scaling
    return out


FP8_CASES = [
    # (prefix lengths, delta lengths, targets, options kwargs)
    ([13, 0, 21, 5], [6, 3, 9, 1], [2, 1, 4, 0], dict()),
    ([10, 27], [11, 2], None, dict(max_attn_len=5)),
    ([9, 18, 3], [5, 7, 3], [5, 2, 3], dict(contextual_seq_len=2)),
    ([22, 6], [3, 10], [3, 4], dict(sla_k1=4, sla_k2=3)),
]


@pytest.mark.parametrize("mode", range(6))
@pytest.mark.parametrize("case", range(len(FP8_CASES)))
def test_fp8_delta_matches_loop_oracle(mode, case):
    prefixes, deltas, targets, kwargs = FP8_CASES[case]
    lengths = [p + d for p, d in zip(prefixes, deltas)]
    options = AttentionOptions(fp8_quant_mode=mode, **kwargs)
    q, k, v = random_qkv(sum(lengths), 2, 8, 8, dtype=torch.bfloat16, seed=case)
    rows = delta_rows(lengths, deltas)
    max_len = max(lengths)
    nt = None if targets is None else torch.tensor(targets)
    got = fp8_delta_hstu_attention_emulated(
        q[rows], k, v, offsets_of(lengths), offsets_of(deltas), max_len, 0.5, options, nt, SMALL_TILES
    )
    want = loop_oracle_fp8_delta(q[rows], k, v, lengths, deltas, max_len, 0.5, options, targets, SMALL_TILES)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-5)
    # Before the bf16 cast (the emulation's float32 result) the agreement is to fp32 summation order.
    got32 = fp8_delta_hstu_attention_emulated(
        q[rows].float(), k.float(), v.float(), offsets_of(lengths), offsets_of(deltas), max_len, 0.5, options, nt,
        SMALL_TILES,
    )
    want32 = loop_oracle_fp8_delta(q[rows].float(), k.float(), v.float(), lengths, deltas, max_len, 0.5, options,
                                   targets, SMALL_TILES)
    torch.testing.assert_close(got32, want32, rtol=2e-5, atol=2e-6 * float(want32.abs().max()))


@pytest.mark.parametrize("mode", range(1, 6))
def test_fp8_aligned_prefix_equals_full_emulation_with_zero_prefix_queries(mode):
    prefixes, deltas, targets = [16, 8, 0, 24], [7, 5, 9, 12], [3, 5, 2, 4]
    lengths = [p + d for p, d in zip(prefixes, deltas)]
    options = AttentionOptions(fp8_quant_mode=mode, contextual_seq_len=1)
    q, k, v = random_qkv(sum(lengths), 2, 8, 8, dtype=torch.float32, seed=mode)
    rows = delta_rows(lengths, deltas)
    q_zero_prefix = torch.zeros_like(q)
    q_zero_prefix[rows] = q[rows]
    nt = torch.tensor(targets)
    full = fp8_hstu_attention_emulated(q_zero_prefix, k, v, offsets_of(lengths), 36, 0.5, options, nt, SMALL_TILES)
    got = fp8_delta_hstu_attention_emulated(
        q[rows], k, v, offsets_of(lengths), offsets_of(deltas), 36, 0.5, options, nt, SMALL_TILES
    )
    torch.testing.assert_close(got, full[rows], rtol=1e-6, atol=1e-7 * float(full.abs().max()))


@pytest.mark.parametrize("options", [AttentionOptions(), AttentionOptions(sla_k1=3, sla_k2=4),
                                     AttentionOptions(contextual_seq_len=2, max_attn_len=4, min_full_attn_seq_len=1)])
def test_fp8_mode0_equals_full_fp8_rows(options):
    # Mode 0 has no data-dependent scale: the delta rows of the full FP8 forward, default tiles.
    lengths, deltas, targets = [40, 3, 150], [17, 3, 20], [5, 1, 20]
    options = AttentionOptions(**{**options.__dict__, "fp8_quant_mode": 0})
    q, k, v = random_qkv(sum(lengths), 2, 16, 16, dtype=torch.float32, seed=7)
    rows = delta_rows(lengths, deltas)
    nt = torch.tensor(targets)
    full = fp8_hstu_attention_emulated(q, k, v, offsets_of(lengths), 150, 0.25, options, nt)
    got = delta_hstu_attention(q[rows], k, v, offsets_of(lengths), 150, 0.25, options, nt, offsets_of(deltas))
    torch.testing.assert_close(got, full[rows], rtol=1e-6, atol=1e-7 * float(full.abs().max()))


def test_fp8_default_tiles_group_rows_from_first_delta_row():
    # 20 delta rows = two 16-row P groups starting at the first delta row; prefix 37 (unaligned).
    lengths, deltas = [57, 30], [20, 18]
    options = AttentionOptions(fp8_quant_mode=2)
    q, k, v = random_qkv(sum(lengths), 1, 16, 16, dtype=torch.float32, seed=11)
    rows = delta_rows(lengths, deltas)
    tiles = FP8TileSizes.for_head_dim(16)
    got = delta_hstu_attention(q[rows], k, v, offsets_of(lengths), 57, 0.25, options, delta_offsets=offsets_of(deltas))
    want = loop_oracle_fp8_delta(q[rows], k, v, lengths, deltas, 57, 0.25, options, None, tiles)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6 * float(want.abs().max()))


# ----------------------------------------------------------------------------- input checks
def _inputs():
    lengths, deltas = [5, 4], [2, 2]
    q, k, v = random_qkv(9, 2, 4, 4)
    return q[delta_rows(lengths, deltas)], k, v, offsets_of(lengths)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "delta_q": a["delta_q"][:3]}, "same number of rows per sequence"),
        (lambda a: {**a, "delta_q": a["delta_q"][..., :3]}, "k must be 3-D"),
        (lambda a: {**a, "v": a["v"][:8]}, "v must be 3-D"),
        (lambda a: {**a, "delta_offsets": torch.tensor([0, 4])}, "B \\+ 1 = 3 entries"),
        (lambda a: {**a, "delta_q": torch.cat([a["delta_q"], a["delta_q"][:2]]),
                    "delta_offsets": torch.tensor([0, 1, 6])}, "<= its full length"),
        (lambda a: {**a, "max_seq_len": 4}, "max_seq_len=4 is smaller"),
        (lambda a: {**a, "num_targets": torch.tensor([1, 7])}, "num_targets must be in"),
        (lambda a: {**a, "kernel": "nope"}, "kernel must be one of"),
        (lambda a: {**a, "k": a["k"].float()}, "share a dtype"),
    ],
)
def test_bad_inputs_raise(change, match):
    delta_q, k, v, offsets = _inputs()
    args = dict(delta_q=delta_q, k=k, v=v, seq_offsets=offsets, max_seq_len=5, alpha=0.5)
    with pytest.raises(ValueError, match=match):
        delta_hstu_attention(**change(args))


def test_triton_on_cpu_tensors_is_refused():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter runs Triton on CPU tensors")
    delta_q, k, v, offsets = _inputs()
    with pytest.raises(ValueError, match="cannot run tensors on cpu"):
        with torch.no_grad():
            delta_hstu_attention(delta_q.float(), k.float(), v.float(), offsets, 5, 0.5, kernel="TRITON")


# ----------------------------------------------------------------------------- Triton (interpreter)
_INTERPRETER_SCRIPT = """
    import json

    import torch
    from torchrec_hstu.ops.common import AttentionOptions
    from torchrec_hstu.ops.pytorch.delta_attention import (
        fp8_delta_hstu_attention_emulated, pytorch_delta_hstu_attention)
    from torchrec_hstu.ops.triton.delta_attention import fp8_delta_fwd, triton_delta_hstu_attention
    from torchrec_hstu.ops.triton.hstu_attention import mask_args_of

    torch.manual_seed(0)
    prefixes, deltas = [30, 16, 0, 45], [3, 17, 5, 20]
    lengths = [p + d for p, d in zip(prefixes, deltas)]
    off = torch.tensor([0] + lengths).cumsum(0)
    doff = torch.tensor([0] + deltas).cumsum(0)
    k, v = (torch.randn(sum(lengths), 2, 16) * 0.5 for _ in range(2))
    dq = torch.randn(sum(deltas), 2, 16) * 0.5
    nt = torch.tensor([2, 1, 0, 3])
    errors = {}
    cases = {
        "causal": (AttentionOptions(), None),
        "targets_ctx_window": (AttentionOptions(contextual_seq_len=2, max_attn_len=7, min_full_attn_seq_len=2), nt),
        "sla": (AttentionOptions(sla_k1=4, sla_k2=6), nt),
        "noncausal": (AttentionOptions(causal=False), nt),
    }
    with torch.no_grad():
        for name, (opts, targets) in cases.items():
            got = triton_delta_hstu_attention(dq, k, v, off, doff, 70, 0.3, opts, targets)
            want = pytorch_delta_hstu_attention(dq, k, v, off, doff, 70, 0.3, opts, targets)
            errors[name] = float((got - want).abs().max() / want.abs().max())
        for mode in range(6):
            opts = AttentionOptions(fp8_quant_mode=mode, contextual_seq_len=1)
            mask = mask_args_of(AttentionOptions(contextual_seq_len=1), True)
            got = fp8_delta_fwd(dq, k, v, off, doff, nt, 70, 20, 0.3, 70, mask, mode)
            want = fp8_delta_hstu_attention_emulated(dq, k, v, off, doff, 70, 0.3, opts, nt)
            errors[f"fp8_mode{mode}"] = float((got - want).abs().max() / want.abs().max())
    print(json.dumps(errors))
    """


def test_triton_kernels_in_interpreter(tmp_path):
    """The Triton delta kernels (fp32 and every FP8 mode) in Triton's CPU interpreter."""
    pytest.importorskip("triton")
    errors = run_in_interpreter(_INTERPRETER_SCRIPT, tmp_path)
    assert len(errors) == 10
    for name, err in errors.items():
        assert err < 1e-5, f"{name}: max error {err:.2e} of max|ref|"


# ----------------------------------------------------------------------------- Triton (device)
def _rel_errors(x: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    x, ref = x.double(), ref.double()
    rel = float((x - ref).norm() / ref.norm().clamp_min(1e-30))
    max_rel = float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return rel, max_rel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "options, with_targets",
    [
        (AttentionOptions(), True),
        (AttentionOptions(), False),
        (AttentionOptions(contextual_seq_len=3, max_attn_len=64), True),
        (AttentionOptions(sla_k1=100, sla_k2=32), True),
    ],
)
def test_triton_delta_on_device(dtype, options, with_targets):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    prefixes = torch.randint(0, 1500, (8,), generator=gen).tolist() + [2000]
    deltas = torch.randint(1, 200, (9,), generator=gen).tolist()
    lengths = [p + d for p, d in zip(prefixes, deltas)]
    q, k, v = (x.to(device) for x in random_qkv(sum(lengths), 4, 128, 128, dtype=torch.float32))
    q, k, v = (x.mul(0.3).to(dtype) for x in (q, k, v))
    rows = delta_rows(lengths, deltas).to(device)
    offsets, doffsets = offsets_of(lengths).to(device), offsets_of(deltas).to(device)
    nt = torch.tensor(deltas, device=device) if with_targets else None
    with torch.no_grad():
        got = delta_hstu_attention(q[rows], k, v, offsets, max(lengths), 1 / math.sqrt(128), options, nt, doffsets,
                                   kernel="TRITON")
        want = delta_hstu_attention(q[rows].float(), k.float(), v.float(), offsets, max(lengths), 1 / math.sqrt(128),
                                    options, nt, doffsets)
    rel, max_rel = _rel_errors(got, want)
    limit = {torch.bfloat16: (1.5e-2, 4e-2), torch.float16: (3e-3, 8e-3)}[dtype]
    assert rel <= limit[0] and max_rel <= limit[1], (rel, max_rel)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", range(6))
def test_triton_fp8_delta_on_device(mode):
    device = torch.device("cuda")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 Triton needs SM89+")
    gen = torch.Generator().manual_seed(mode)
    prefixes = torch.randint(0, 700, (6,), generator=gen).tolist()
    deltas = torch.randint(1, 100, (6,), generator=gen).tolist()
    lengths = [p + d for p, d in zip(prefixes, deltas)]
    q, k, v = (x.to(device).to(torch.bfloat16) for x in random_qkv(sum(lengths), 2, 128, 128, dtype=torch.float32))
    rows = delta_rows(lengths, deltas).to(device)
    offsets, doffsets = offsets_of(lengths).to(device), offsets_of(deltas).to(device)
    options = AttentionOptions(fp8_quant_mode=mode)
    nt = torch.tensor(deltas, device=device)
    with torch.no_grad():
        got = delta_hstu_attention(q[rows], k, v, offsets, max(lengths), 0.1, options, nt, doffsets, kernel="TRITON")
        want = delta_hstu_attention(q[rows].float(), k.float(), v.float(), offsets, max(lengths), 0.1, options, nt,
                                    doffsets)
    # Same definition; bf16 output rounding plus rare fp8 rounding flips of P near a tie.
    rel, _ = _rel_errors(got, want)
    assert rel <= 1e-2, rel
