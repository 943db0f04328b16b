"""A/B timing of the Triton attention kernels between two copies of the package (GPU).

Run it once per copy, with the copy's parent folder as the working directory, so that
``import torchrec_hstu`` finds that copy (the script's own folder must not come first on
``sys.path``, hence ``exec``), and alternate the copies a few times: one process's timings on a
shared GPU move by tens of percent between runs.

    git archive <base> torchrec_hstu | tar -x -C /tmp/base       # the copy to compare against
    for round in 1 2 3; do
      for dir in "$PWD" /tmp/base; do
        (cd "$dir" && TORCHREC_HSTU_TRITON_AUTOTUNE=0 python -c \\
          "exec(open('$PWD/benchmarks/tools/triton_kernel_ab.py').read())") >> ab.jsonl
      done
    done

With ``AB_SHAPES`` set (and autotuning left on, so each copy runs its own launcher's pick), it
prints only bf16 and FP8 mode 2 causal rows of those shapes.

Each run prints one JSON line: the package path and ``triton.testing.do_bench`` medians (ms) of
bf16 forward and forward+backward (causal; targets + contextual prefix + window), FP8 mode 2
forward and forward+backward, and the delta forward (32 new rows per sequence). Autotuning off
(``TORCHREC_HSTU_TRITON_AUTOTUNE=0``) gives both copies the same heuristic config.
"""

import json
import os

import torch
import triton

import torchrec_hstu
from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.triton.delta_attention import triton_delta_hstu_attention
from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention
from torchrec_hstu.ops.triton.hstu_attention import triton_hstu_attention

BATCH, SEQ_LEN, HEADS, HEAD_DIM, DELTA_ROWS = 8, 2048, 4, 128, 32
#: ``AB_SHAPES="16x8192x128,16x8192x256"`` (batch x length x head dim) replaces the default
#: shape for the bf16 and FP8 causal rows (the masked and delta rows keep the default shape).
AB_SHAPES = os.environ.get("AB_SHAPES", "")


def bench(fn, warmup: int = 10) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=200, return_mode="median")


def fwd_bwd(attention, q, k, v, dout, *args):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def run() -> None:
        out = attention(*leaves, *args)
        torch.autograd.grad(out, leaves, dout)

    return run


def shape_rows() -> dict:
    """bf16 and FP8 mode 2 causal forward / forward+backward for each ``AB_SHAPES`` entry."""
    result = {}
    for spec in filter(None, AB_SHAPES.split(",")):
        batch, seq_len, dim = map(int, spec.split("x"))
        offsets = torch.arange(0, batch + 1, device="cuda") * seq_len
        q, k, v, dout = (torch.randn(batch * seq_len, HEADS, dim, device="cuda",
                                     dtype=torch.bfloat16) * 0.5 for _ in range(4))
        args = (offsets, seq_len, dim ** -0.5, AttentionOptions(), None)
        fp8_args = (offsets, seq_len, dim ** -0.5, AttentionOptions(fp8_quant_mode=2))
        inputs = (q, k, v)
        result[f"bf16_fwd/{spec}"] = bench(
            lambda inputs=inputs, args=args: triton_hstu_attention(*inputs, *args), warmup=25)
        result[f"bf16_fwd_bwd/{spec}"] = bench(fwd_bwd(triton_hstu_attention, q, k, v, dout, *args))
        result[f"fp8m2_fwd/{spec}"] = bench(
            lambda inputs=inputs, args=fp8_args: triton_fp8_hstu_attention(*inputs, *args))
        result[f"fp8m2_fwd_bwd/{spec}"] = bench(
            fwd_bwd(triton_fp8_hstu_attention, q, k, v, dout, *fp8_args), warmup=5)
    return result


def main() -> None:
    if AB_SHAPES:
        print(json.dumps({"package": os.path.dirname(torchrec_hstu.__file__), **shape_rows()}))
        return
    torch.manual_seed(0)
    offsets = torch.arange(0, BATCH + 1, device="cuda") * SEQ_LEN
    q, k, v, dout = (torch.randn(BATCH * SEQ_LEN, HEADS, HEAD_DIM, device="cuda",
                                 dtype=torch.bfloat16) * 0.5 for _ in range(4))
    num_targets = torch.full((BATCH,), 16, device="cuda")
    result = {"package": os.path.dirname(torchrec_hstu.__file__)}
    for name, options, targets in [
        ("causal", AttentionOptions(), None),
        ("targets_ctx_window", AttentionOptions(contextual_seq_len=4, max_attn_len=512), num_targets),
    ]:
        args = (offsets, SEQ_LEN, 0.125, options, targets)
        result[f"bf16_fwd/{name}"] = bench(lambda: triton_hstu_attention(q, k, v, *args), warmup=25)
        result[f"bf16_fwd_bwd/{name}"] = bench(fwd_bwd(triton_hstu_attention, q, k, v, dout, *args))
    fp8_args = (offsets, SEQ_LEN, 0.125, AttentionOptions(fp8_quant_mode=2))
    result["fp8m2_fwd/causal"] = bench(lambda: triton_fp8_hstu_attention(q, k, v, *fp8_args))
    result["fp8m2_fwd_bwd/causal"] = bench(fwd_bwd(triton_fp8_hstu_attention, q, k, v, dout, *fp8_args),
                                           warmup=5)
    delta_offsets = torch.arange(0, BATCH + 1, device="cuda") * DELTA_ROWS
    delta_q = torch.randn(BATCH * DELTA_ROWS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        result[f"delta_fwd/{DELTA_ROWS}rows"] = bench(lambda: triton_delta_hstu_attention(
            delta_q, k, v, offsets, delta_offsets, SEQ_LEN, 0.125, AttentionOptions()), warmup=25)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
