"""Measured accuracy of the FP8 emulation (forward and every gradient) against the float64
reference, per fp8_quant_mode, asserted within the bounds stated in docs/fp8.md.

The full grid and its table are produced by ``benchmarks/fp8_accuracy.py``; this test runs a
smaller grid of the same kind (bf16 inputs ``N(0, 1)`` times an input scale, ``alpha =
1/sqrt(D)``) and checks the stated bounds, plus that the plain bf16 path is far more accurate
(the errors measured are FP8's, not the harness's).
"""

from typing import Dict, List, Optional

import pytest
import torch

from benchmarks.fp8_accuracy import draw_input
from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
from torchrec_hstu.ops.pytorch.hstu_attention import pytorch_hstu_attention

TENSORS = ("O", "dQ", "dK", "dV")
# Bounds stated in docs/fp8.md: (rel_rms, max_rel) with rel_rms = ||x - ref|| / ||ref|| and
# max_rel = max|x - ref| / max|ref|, for modes 1..5 (mode 0 separately, it has no scales).
BOUNDS = {
    "1": {t: (0.07, 0.12) for t in TENSORS},
    "0.05": {t: (0.07, 0.12) for t in TENSORS},
    "token": {"O": (0.07, 0.12), "dV": (0.07, 0.15), "dQ": (0.25, 0.7), "dK": (0.25, 0.7)},
}
MODE0_BOUNDS = {
    "1": {t: (0.07, 0.12) for t in TENSORS},
    "0.05": {"O": (0.6, 0.8), "dV": (0.6, 0.8), "dQ": (0.1, 0.15), "dK": (0.1, 0.15)},
    "token": {"O": (0.07, 0.12), "dV": (0.07, 0.15), "dQ": (0.45, 1.0), "dK": (0.45, 1.0)},
}
BF16_BOUND = 0.005  # rel_rms and max_rel of the plain bf16 path


def run(fn, tensors: List[torch.Tensor], grad: torch.Tensor) -> List[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, leaves, grad.to(out.dtype))]


def rel_errors(x: torch.Tensor, ref: torch.Tensor) -> tuple:
    err = x.double() - ref
    return float(err.norm() / ref.norm()), float(err.abs().max() / ref.abs().max())


@pytest.mark.parametrize("scale", ["1", "0.05", "token"])
@pytest.mark.parametrize(
    "dim,mask",
    [(64, "causal"), (64, "contextual+targets"), (128, "sla+targets")],
)
def test_fp8_error_within_stated_bounds(scale, dim, mask):
    lengths = [0, 1, 37, 150, 260]
    gen = torch.Generator().manual_seed(dim)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    q, k, v, grad = (draw_input(sum(lengths), 2, dim, scale, gen) for _ in range(4))
    kwargs: Dict = {}
    nt: Optional[torch.Tensor] = None
    if mask != "causal":
        nt = torch.tensor([0, 1, 3, 5, 8])
        kwargs = dict(contextual_seq_len=2) if mask == "contextual+targets" else dict(sla_k1=64, sla_k2=16)
    alpha, max_len = dim ** -0.5, max(lengths)
    base = AttentionOptions(**kwargs)

    def reference(q_, k_, v_):
        return pytorch_hstu_attention(q_, k_, v_, offsets, max_len, alpha, base, nt)

    gold = run(reference, [q.double(), k.double(), v.double()], grad.double())
    for name, x, ref in zip(TENSORS, run(reference, [q, k, v], grad), gold):
        assert max(rel_errors(x, ref)) <= BF16_BOUND, ("bf16", name)
    for mode in range(6):
        options = AttentionOptions(fp8_quant_mode=mode, **kwargs)
        results = run(
            lambda q_, k_, v_: fp8_hstu_attention_emulated(q_, k_, v_, offsets, max_len, alpha, options, nt),
            [q, k, v],
            grad,
        )
        bounds = (MODE0_BOUNDS if mode == 0 else BOUNDS)[scale]
        for name, x, ref in zip(TENSORS, results, gold):
            assert x.dtype == torch.bfloat16 and x.shape == ref.shape
            rel_rms, max_rel = rel_errors(x, ref)
            rms_bound, max_bound = bounds[name]
            assert rel_rms <= rms_bound and max_rel <= max_bound, (mode, name, rel_rms, max_rel)
            # FP8 error is real quantization error, well above the bf16 path's
            assert rel_rms >= 0.02, (mode, name, rel_rms)
