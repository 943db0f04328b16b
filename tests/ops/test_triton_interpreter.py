"""The full Triton attention kernels, forward and backward, in Triton's CPU interpreter.

CI has no GPU, so this is where the kernels' Python/Triton code (tile ranges, the four tile
segments, masks, both backward launch layouts, the custom ops' autograd) runs on every change:

* ``triton_hstu_attention`` on float32 inputs against the PyTorch reference, for every mask
  mode of :mod:`torchrec_hstu.ops.triton._common` (plain causal, id rule causal and
  non-causal with targets, contextual prefix and window, SLA, plain non-causal), head dims
  that fill the block and that do not (24 / 40 in blocks of 32 / 64), every backward layout
  (fused, split dV | dK+dQ, and dQ by its own query-parallel kernel after either);
* ``triton_fp8_hstu_attention`` for every ``fp8_quant_mode`` against the PyTorch FP8
  emulation (same quantizers and tiles; fp32 summation order apart): the default "fast"
  accumulation against the emulation with per-row P / dS scales
  (``FP8TileSizes.bwd_row_scales``; dQ by the query-parallel dQ kernel after a split or a
  fused dK / dV launch), "precise" against the tile-scaled one (dQ by atomics and by the dQ
  kernel);
* the eager FP8 backward reusing the forward's quantized operands: bit-identical to the custom
  op's route, which quantizes again, with fewer quantizer launches.

The GPU runs of the same kernels (bf16/fp16, real fp8 tensor cores, autotuned tiles) are in
``test_triton_attention.py`` and ``test_triton_fp8.py`` (``gpu`` marker).
"""

import pytest

from tests.ops.triton_interpreter import run_in_interpreter

pytest.importorskip("triton")

_SCRIPT = """
    import functools
    import json

    import torch
    from torchrec_hstu.ops.common import AttentionOptions
    from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes
    from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention
    from torchrec_hstu.ops.triton import fp8_attention
    from torchrec_hstu.ops.triton import hstu_attention as triton_attention
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention
    from torchrec_hstu.ops.triton.hstu_attention import KernelConfig, triton_hstu_attention

    PART = "__PART__"
    torch.manual_seed(0)
    lengths = [0, 1, 37, 70, 5]
    offsets = offsets_jagged = torch.tensor([0] + lengths).cumsum(0)
    total, max_seq_len = sum(lengths), 70
    num_targets = torch.tensor([0, 1, 3, 5, 2])


    def run(fn, q, k, v, dout, options, targets, **kwargs):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, offsets, max_seq_len, 0.3, options, targets, **kwargs)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, dout))


    def errors(got, want):
        # max |got - want| / max |want| per output (out, dq, dk, dv)
        return [float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want)]


    result = {}
    masks = {
        "plain_causal": (AttentionOptions(), None),
        "id_rule_causal": (AttentionOptions(contextual_seq_len=2, max_attn_len=9, min_full_attn_seq_len=3), num_targets),
        "id_rule_full": (AttentionOptions(causal=False, contextual_seq_len=1), num_targets),
        "sla": (AttentionOptions(sla_k1=6, sla_k2=10), num_targets),
        "plain_full": (AttentionOptions(causal=False), None),
    }
    split = KernelConfig(16, 32, 4, 1, split_bwd=True)
    # dQ by its own query-parallel kernel (no atomics), after a fused dK/dV launch or a split one.
    dq_kernel = KernelConfig(16, 32, 4, 1, dq=KernelConfig(32, 16, 4, 1))
    split_dq_kernel = KernelConfig(32, 16, 4, 1, split_bwd=True, dq=KernelConfig(16, 32, 4, 1))
    fused_candidates = triton_attention.bwd_candidates
    for dqk, dv in ([(16, 16), (24, 40)] if PART == "bf16" else []):
        q, k = (torch.randn(total, 2, dqk) * 0.5 for _ in range(2))
        v, dout = (torch.randn(total, 2, dv) * 0.5 for _ in range(2))
        for name, (options, targets) in masks.items():
            want = run(pytorch_hstu_attention, q.double(), k.double(), v.double(), dout.double(), options, targets)
            result[f"{name}/d{dqk}x{dv}"] = errors(run(triton_hstu_attention, q, k, v, dout, options, targets), want)
            # Each backward layout as the only candidate, so the launcher picks it (the
            # interpreter never autotunes).
            layouts = {"dq_kernel": dq_kernel}
            if dqk == 16:
                layouts.update(split_bwd=split, split_dq_kernel=split_dq_kernel)
            for layout, config in layouts.items():
                triton_attention.bwd_candidates = lambda *_, config=config: [config]
                result[f"{name}/d{dqk}x{dv}/{layout}"] = errors(
                    run(triton_hstu_attention, q, k, v, dout, options, targets), want)
                triton_attention.bwd_candidates = fused_candidates
    q, k, v, dout = (torch.randn(total, 2, 32) * 0.5 for _ in range(4))
    fp8_candidates = fp8_attention.fp8_bwd_candidates
    # FP8 backward layouts: dQ by atomics (split dV | dK+dQ; tile scales only) and by its own
    # query-parallel kernel after a split or a fused dK / dV launch.
    fp8_layouts = {"atomic_dq": KernelConfig(0, 0, 4, 1, split_bwd=True),
                   "dq_kernel": KernelConfig(0, 0, 4, 1, split_bwd=True, dq=KernelConfig(0, 0, 4, 1)),
                   "fused_dq_kernel": KernelConfig(0, 0, 4, 1, dq=KernelConfig(0, 0, 4, 1))}
    row_scales = FP8TileSizes.for_head_dim(32, bwd_row_scales=True)
    for mode in (range(6) if PART == "fp8" else []):
        options = AttentionOptions(fp8_quant_mode=mode, contextual_seq_len=1, max_attn_len=20)
        wants = {"fast": run(fp8_hstu_attention_emulated, q, k, v, dout, options, num_targets,
                             tile_sizes=row_scales),
                 "precise": run(fp8_hstu_attention_emulated, q, k, v, dout, options, num_targets)}
        layouts = {"fast": ["dq_kernel"] + (["fused_dq_kernel"] if mode in (1, 2) else []),
                   "precise": ["atomic_dq"] + (["dq_kernel"] if mode in (1, 2) else [])}
        for accumulation, names in layouts.items():
            for layout in names:
                config = fp8_layouts[layout]
                fp8_attention.fp8_bwd_candidates = lambda *_, config=config: [config]
                result[f"fp8_mode{mode}/{accumulation}/{layout}"] = errors(
                    run(triton_fp8_hstu_attention, q, k, v, dout, options, num_targets,
                        fp8_accumulation=accumulation), wants[accumulation])
                fp8_attention.fp8_bwd_candidates = fp8_candidates
    # The key-parallel launch reading q, dO and their transposes through TMA descriptors of the
    # whole batch: rows past a sequence are the next sequence's, which the masks must zero (the
    # interpreter runs the loads; the dQ bulk reduction is GPU-only). The 300-token sequence has
    # interior (unmasked) tiles, the id-rule masks above do not.
    fp8_bwd = fp8_attention.fp8_bwd
    tma_offsets = torch.tensor([0, 300, 301, 341]), 300
    real_empty = torch.empty

    def nan_filled_empty(*args, **kwargs):
        # Every fp8 buffer starts as NaN codes: a column the TMA boxes read but nothing wrote
        # (the gaps of the aligned transposed layout) shows up as NaN gradients.
        out = real_empty(*args, **kwargs)
        if out.dtype == torch.float8_e4m3fn:
            out.view(torch.uint8).fill_(0x7F)
        return out

    torch.empty = nan_filled_empty
    # The aligned transposed layout writes every column (zeros between sequences).
    if PART == "fp8":
        x = torch.randn(341, 2, 32).to(torch.float8_e4m3fn)
        xt = fp8_attention._transposed_aligned(x, tma_offsets[0], 300).view(torch.uint8)
        expect = torch.zeros_like(xt)
        for b, (s, e) in enumerate(zip(tma_offsets[0][:-1].tolist(), tma_offsets[0][1:].tolist())):
            col = ((s + 15) // 16 + b) * 16
            expect[:, :, col:col + e - s] = x[s:e].permute(1, 2, 0).view(torch.uint8)
        result["transposed_layout/bytes_differing"] = [int((xt != expect).sum())] * 4
    # TMA loads with each accumulation's layout: "fast" (row scales, dQ kernel) and "precise"
    # (tile scales, dQ by atomics: on the GPU a bulk reduction, here plain atomics).
    tma_cases = [(mode, accumulation, layout) for mode in ((1, 2) if PART == "fp8" else [])
                 for accumulation, layout in (("fast", "dq_kernel"), ("precise", "atomic_dq"))]
    for mode, accumulation, layout in tma_cases:
        fp8_attention.fp8_bwd = functools.partial(fp8_bwd, tma=True)
        fp8_attention.fp8_bwd_candidates = lambda *_, layout=layout: [fp8_layouts[layout]]
        for name, (opts, targets) in {"plain_causal": (AttentionOptions(fp8_quant_mode=mode), None),
                                      "id_rule": (AttentionOptions(fp8_quant_mode=mode, contextual_seq_len=1,
                                                                   max_attn_len=20), num_targets)}.items():
            offsets, max_seq_len = tma_offsets if name == "plain_causal" else (offsets_jagged, 70)
            total = int(offsets[-1])
            q, k, v, dout = (torch.randn(total, 2, 32) * 0.5 for _ in range(4))
            targets = None if targets is None else targets[:offsets.numel() - 1]
            got = run(triton_fp8_hstu_attention, q, k, v, dout, opts, targets, fp8_accumulation=accumulation)
            fp8_attention.fp8_bwd = fp8_bwd
            want = run(triton_fp8_hstu_attention, q, k, v, dout, opts, targets, fp8_accumulation=accumulation)
            fp8_attention.fp8_bwd = functools.partial(fp8_bwd, tma=True)
            result[f"fp8_mode{mode}/tma/{accumulation}/{name}"] = errors(got, want)
        fp8_attention.fp8_bwd = fp8_bwd
        fp8_attention.fp8_bwd_candidates = fp8_candidates
    torch.empty = real_empty
    print(json.dumps(result))
"""


# Two processes (bf16 / fp16 kernels, FP8 kernels), so pytest-xdist runs them side by side.
@pytest.mark.parametrize("part,cases", [("bf16", 5 * 2 * 2 + 5 * 2), ("fp8", 6 * 2 + 2 * 2 + 2 * 2 * 2 + 1)])
def test_full_triton_kernels_forward_and_backward(tmp_path, part, cases):
    result = run_in_interpreter(_SCRIPT.replace("__PART__", part), tmp_path)
    assert len(result) == cases
    for name, errs in result.items():
        # fp32 vs the float64 reference; FP8 vs the emulation: the same fp8 products, fp32 sums
        # in another order. Measured (2026-11-25, Triton 3.6 interpreter): <= 3.6e-7 for both.
        for output, err in zip(("out", "dq", "dk", "dv"), errs):
            assert err < 1e-5, f"{name} {output}: max error {err:.2e} of max|ref|"


_QUANTIZER_SCRIPT = """
    import json

    import torch
    from torchrec_hstu.ops.fp8.quantize import quantize_for_mode
    from torchrec_hstu.ops.triton import fp8_quantize
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode

    torch.manual_seed(0)
    lengths = [0, 1, 37, 70, 5]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    x = torch.randn(sum(lengths), 2, 24) * 3
    variants = [(0, False), (1, False), (1, True), (2, False), (3, False), (4, False), (5, False)]
    result = {}
    # (exact, sub_t): the whole tile, 8-token pieces (two reads per piece in modes 2 and 1
    # column-wise), and the default reciprocal multiply.
    for exact, sub_t in ((True, None), (True, 8), (False, None)):
        for mode, colwise in variants:
            want = quantize_for_mode(x, offsets, mode, 32, colwise=colwise, chunk=32)
            fp8_quantize._TUNING.clear()
            if sub_t:
                fp8_quantize._TUNING["sub_t"] = sub_t
            got = triton_quantize_for_mode(x, offsets, mode, 32, colwise=colwise, chunk=32,
                                           max_seq_len=70, exact=exact)
            fp8_quantize._TUNING.clear()
            a = got.values.view(torch.uint8).int()
            b = want.values.view(torch.uint8).int()
            result[f"exact={exact}/sub_t={sub_t}/mode={mode}/colwise={colwise}"] = dict(
                differ=int((a != b).sum()), max_code_step=int((a - b).abs().max()),
                same_sign=bool(((a ^ b) & 0x80).eq(0).all()),
                descales=bool(torch.equal(got.descale, want.descale)
                              and torch.equal(got.token_descale, want.token_descale)))
    # Block offsets computed once by the caller and shared between operands: same outputs; a
    # wrong shape is refused.
    from torchrec_hstu.ops.fp8.quantize import sequence_block_offsets

    shared = {}
    for mode, colwise in ((2, False), (1, True)):
        own = triton_quantize_for_mode(x, offsets, mode, 32, colwise=colwise, chunk=32, max_seq_len=70)
        given = triton_quantize_for_mode(x, offsets, mode, 32, colwise=colwise, chunk=32, max_seq_len=70,
                                         block_offsets=sequence_block_offsets(offsets, 32))
        shared[f"mode={mode}"] = all(torch.equal(getattr(own, f), getattr(given, f)) for f in
                                     ("values", "descale", "token_descale", "block_offsets"))
    try:
        triton_quantize_for_mode(x, offsets, 2, 32, max_seq_len=70, block_offsets=offsets[:-1])
        shared["refused"] = False
    except ValueError as err:
        shared["refused"] = "block_offsets must be a [B + 1]" in str(err)
    result["shared_block_offsets"] = shared
    print(json.dumps(result))
"""


def test_fp8_quantizers_against_pytorch(tmp_path):
    """The fused quantizers in the interpreter (integer cast) vs the PyTorch quantizers: with
    ``exact`` bit-identical (whole tiles and tiles walked in pieces); by default (reciprocal
    multiply) the same descales and fp8 codes at most one step apart; caller-given block offsets
    change nothing, and a wrong one is refused."""
    result = run_in_interpreter(_QUANTIZER_SCRIPT, tmp_path)
    assert result.pop("shared_block_offsets") == {"mode=2": True, "mode=1": True, "refused": True}
    assert len(result) == 21
    for name, r in result.items():
        assert r["descales"], name
        assert r["same_sign"] and r["max_code_step"] <= 1, (name, r)
        if name.startswith("exact=True"):
            assert r["differ"] == 0, (name, r)


_REUSE_SCRIPT = """
    import json

    import torch
    from torchrec_hstu.ops import custom_ops
    from torchrec_hstu.ops.common import AttentionOptions
    from torchrec_hstu.ops.triton import fp8_quantize
    from torchrec_hstu.ops.triton.fp8_attention import fp8_bwd_reused_operands, triton_fp8_hstu_attention

    torch.manual_seed(0)
    lengths = [0, 1, 37, 70, 5]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    q, k, v, dout = (torch.randn(sum(lengths), 2, 32) * 0.5 for _ in range(4))
    quantize = fp8_quantize.triton_quantize_for_mode
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return quantize(*args, **kwargs)

    fp8_quantize.triton_quantize_for_mode = counted
    skips = custom_ops.eager_call_skips_dispatcher
    result = {}
    for mode in (0, 1, 2, 5):
        options = AttentionOptions(fp8_quant_mode=mode, contextual_seq_len=1)
        runs = {}
        for route, skip in (("eager", skips), ("op", lambda tensors: False)):
            custom_ops.eager_call_skips_dispatcher = skip
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            calls.clear()
            out = triton_fp8_hstu_attention(*leaves, offsets, 70, 0.3, options)
            grads = torch.autograd.grad(out, leaves, dout)
            runs[route] = ([out] + list(grads), len(calls))
        custom_ops.eager_call_skips_dispatcher = skips
        result[f"mode{mode}"] = dict(
            identical=all(torch.equal(a, b) for a, b in zip(runs["eager"][0], runs["op"][0])),
            quantize_calls=[runs["eager"][1], runs["op"][1]],
            reused=list(fp8_bwd_reused_operands(mode, 32, 32)))
    print(json.dumps(result))
"""


def test_fp8_backward_reuses_the_forward_quantization(tmp_path):
    """Eager FP8 calls hand the forward's quantized q / k / v to the backward where it would
    quantize them the same way (modes 0, 3-5 all three; mode 2 k and v at head dims <= 128;
    mode 1 none): the same outputs and gradients, bit for bit, as the custom op's route (which
    quantizes again), with that many fewer quantizer launches."""
    result = run_in_interpreter(_REUSE_SCRIPT, tmp_path)
    expected_reused = {"mode0": ["q", "k", "v"], "mode1": [], "mode2": ["k", "v"], "mode5": ["q", "k", "v"]}
    # Op route: 3 forward quantizations + 4 backward (mode 1: + 3 column-wise in the backward).
    op_calls = {"mode0": 7, "mode1": 10, "mode2": 7, "mode5": 7}
    for name, r in result.items():
        assert r["identical"], name
        assert r["reused"] == expected_reused[name], name
        assert r["quantize_calls"] == [op_calls[name] - len(r["reused"]), op_calls[name]], (name, r)


@pytest.mark.parametrize("head_dim", [32, 128, 256])
@pytest.mark.parametrize("mode", range(6))
def test_reused_operands_are_those_quantized_alike(mode, head_dim):
    """``fp8_bwd_reused_operands`` names exactly the operands whose forward quantization (the
    PyTorch quantizers with the forward's blocks) equals the backward's (its blocks; mode 1 also
    needs column scales there, which the forward does not make for q and k)."""
    import torch

    from torchrec_hstu.ops.fp8.quantize import FP8TileSizes, quantize_for_mode
    from torchrec_hstu.ops.triton.fp8_attention import fp8_bwd_reused_operands

    tiles = FP8TileSizes.for_head_dim(head_dim)
    offsets = torch.tensor([0, 1, 200, 330])
    x = torch.randn(330, 2, head_dim, generator=torch.Generator().manual_seed(mode)) * 3
    blocks = {"q": (tiles.fwd_block_m, tiles.bwd_block_m), "k": (tiles.fwd_block_n, tiles.bwd_block_n),
              "v": (tiles.fwd_block_n, tiles.bwd_block_n)}
    alike = []
    for name, (fwd_block, bwd_block) in blocks.items():
        fwd = quantize_for_mode(x, offsets, mode, fwd_block, colwise=name == "v")
        bwd = quantize_for_mode(x, offsets, mode, bwd_block)
        same = torch.equal(fwd.values.view(torch.uint8), bwd.values.view(torch.uint8)) and torch.equal(
            fwd.token_descale, bwd.token_descale)
        if same and not (mode == 1 and name in ("q", "k")):
            alike.append(name)
    assert list(fp8_bwd_reused_operands(mode, head_dim, head_dim)) == alike


def test_backward_refuses_a_forward_quantization_it_would_not_reuse():
    """Mode 2's q blocks differ between the passes (128 forward, 64 backward): handing the
    forward's q to the backward is refused before anything runs."""
    import torch

    from torchrec_hstu.ops.common import AttentionOptions
    from torchrec_hstu.ops.fp8.quantize import quantize_for_mode
    from torchrec_hstu.ops.triton.fp8_attention import fp8_bwd
    from torchrec_hstu.ops.triton.hstu_attention import mask_args_of

    offsets = torch.tensor([0, 40])
    q, k, v, dout = (torch.randn(40, 2, 32) for _ in range(4))
    mask = mask_args_of(AttentionOptions(fp8_quant_mode=2), False)
    with pytest.raises(ValueError, match=r"forward_quantized: mode 2 .* reuses only \('k', 'v'\); got \['q'\]"):
        fp8_bwd(dout, q, k, v, offsets, None, 40, 0.3, 40, mask, 2,
                forward_quantized={"q": quantize_for_mode(q, offsets, 2, 128)})
