"""Compile the FP8 forward kernel for sm90 on a CPU and summarize its PTX (static evidence).

    .venv/bin/python benchmarks/tools/fp8_fwd_ptx.py [--dump DIR] [--acc precise,fast] [--modes 2,5]

Prints, per (mode, accumulation, config), the count of selected opcodes over the whole kernel:
wgmma (fp8 e4m3 or not), wgmma waits/fences, shared loads/stores, barriers, MUFU ops
(ex2/rcp/tanh/div), cvt to e4m3, fma/mul, shuffles; plus registers/spills are not known
without ptxas -v (Triton's compile reports n_regs/n_spills where its bundled ptxas ran).
"""
import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_ptx_ops import _signature  # noqa: E402

KEYS = [
    ("wgmma.e4m3", lambda op, line: op.startswith("wgmma.mma_async") and "e4m3" in op),
    ("wgmma.other", lambda op, line: op.startswith("wgmma.mma_async") and "e4m3" not in op),
    ("mma.sync", lambda op, line: op.startswith("mma.sync")),
    ("wgmma.wait", lambda op, line: op.startswith("wgmma.wait_group")),
    ("wgmma.fence", lambda op, line: op.startswith("wgmma.fence")),
    ("wgmma.commit", lambda op, line: op.startswith("wgmma.commit")),
    ("bar.sync", lambda op, line: op.startswith(("bar.sync", "barrier"))),
    ("st.shared", lambda op, line: op.startswith("st.shared")),
    ("ld.shared", lambda op, line: op.startswith("ld.shared")),
    ("stmatrix", lambda op, line: op.startswith("stmatrix")),
    ("ldmatrix", lambda op, line: op.startswith("ldmatrix")),
    ("cp.async", lambda op, line: op.startswith("cp.async")),
    ("mbarrier", lambda op, line: op.startswith("mbarrier")),
    ("ld.global", lambda op, line: op.startswith("ld.global")),
    ("ex2", lambda op, line: op.startswith("ex2")),
    ("rcp", lambda op, line: op.startswith("rcp")),
    ("div", lambda op, line: op.startswith("div")),
    ("tanh", lambda op, line: op.startswith("tanh")),
    ("cvt.e4m3", lambda op, line: op.startswith("cvt") and "e4m3" in op),
    ("cvt.other", lambda op, line: op.startswith("cvt") and "e4m3" not in op),
    ("fma", lambda op, line: op.startswith("fma")),
    ("mul.f32", lambda op, line: op.startswith("mul") and "f32" in op),
    ("add.f32", lambda op, line: op.startswith(("add", "sub")) and "f32" in op),
    ("max/min.f32", lambda op, line: op.startswith(("max", "min")) and "f32" in op),
    ("abs.f32", lambda op, line: op.startswith("abs") and "f32" in op),
    ("selp", lambda op, line: op.startswith("selp")),
    ("shfl", lambda op, line: op.startswith("shfl")),
]


#: Integer arguments a real launch at H=4, D=128, L % 16 == 0 passes as multiples of 16 (Triton
#: specializes those as ``tt.divisibility=16``); descale strides (H) are not.
ALIGNED_INTS = {"stride_qm", "stride_qh", "stride_km", "stride_kh", "stride_vth", "stride_vtd",
                "stride_om", "stride_oh", "stride_vm", "stride_vh", "NPAD"}


def compile_ptx(fn, constexprs, num_warps, num_stages, maxnreg=None):
    signature = _signature(fn, constexprs, True)
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        if signature[name].startswith("*") or name in ALIGNED_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs, attrs=attrs)
    kernel = triton_compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages,
                                         **({"maxnreg": maxnreg} if maxnreg else {})))
    return kernel


def _ptxas_report(ptx):
    """``ptxas -v`` of Triton's bundled ptxas: registers and spills (sm_90a)."""
    import glob
    import subprocess
    import tempfile

    import triton

    ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))
    if not ptxas:
        return "no ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas[0], "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'}"


def summarize(ptx):
    counts = collections.Counter()
    total = 0
    for line in ptx.splitlines():
        line = line.strip()
        if not line or line.startswith((".", "{", "}", "//", "$")) or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%\S+\s+", "", line)
        op = line.split()[0]
        total += 1
        for key, pred in KEYS:
            if pred(op, line):
                counts[key] += 1
    counts["total"] = total
    return counts


def main():
    from torchrec_hstu.ops.triton import fp8_attention

    parser = argparse.ArgumentParser()
    parser.add_argument("--dump")
    parser.add_argument("--acc", default="precise,fast")
    parser.add_argument("--modes", default="2")
    parser.add_argument("--mask", type=int, default=0)
    parser.add_argument("--configs", default="64:4:3", help="bm:warps:stages[:maxnreg],...")
    parser.add_argument("--extra", default="", help="k=v,... extra constexprs (ints)")
    parser.add_argument("--dim", type=int, default=128, help="head dim (BLOCK_N 64 above 128)")
    args = parser.parse_args()
    extra = dict(FAST_SILU=0, SCALAR_QD=0, SCALAR_KVD=0, VT_ALIGNED=0, RESCALE=0)
    for item in filter(None, args.extra.split(",")):
        k, v = item.split("=")
        extra[k] = int(v)
    rows = []
    for mode in map(int, args.modes.split(",")):
        for acc in args.acc.split(","):
            for cfg in args.configs.split(","):
                fields = list(map(int, cfg.split(":")))
                bm, warps, stages = fields[:3]
                maxnreg = fields[3] if len(fields) > 3 else None
                d = args.dim
                constexprs = dict(DQK=d, DV=d, BLOCK_DQK=d, BLOCK_DV=d, BLOCK_M=bm,
                                  BLOCK_N=128 if d <= 128 else 64, P_ROWS=16, QUANT_MODE=mode, MASK_MODE=args.mask,
                                  HAS_TARGETS=False, INTERPRET=False,
                                  MAX_IMPRECISE=fp8_attention._max_imprecise(False, acc),
                                  MAX_IMPRECISE_S=fp8_attention._max_imprecise(True, acc))
                constexprs.update(extra)
                fn = fp8_attention._fp8_fwd_kernel
                names = set(fn.arg_names)
                for key in list(constexprs):
                    if key not in names:
                        constexprs.pop(key)
                if hasattr(fp8_attention, "fwd_constexprs"):
                    constexprs = fp8_attention.fwd_constexprs(constexprs, acc)
                kernel = compile_ptx(fn, constexprs, warps, stages, maxnreg)
                counts = summarize(kernel.asm["ptx"])
                name = f"m{mode}_{acc}_bm{bm}_w{warps}_s{stages}" + (f"_r{maxnreg}" if maxnreg else "")
                meta = getattr(kernel, "metadata", None)
                shared = getattr(meta, "shared", None)
                nregs = getattr(kernel, "n_regs", None)
                nspills = getattr(kernel, "n_spills", None)
                rows.append((name, counts, shared, nregs, nspills))
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    with open(os.path.join(args.dump, name + ".ptx"), "w") as f:
                        f.write(kernel.asm["ptx"])
                    if "ttgir" in kernel.asm:
                        with open(os.path.join(args.dump, name + ".ttgir"), "w") as f:
                            f.write(kernel.asm["ttgir"])
                regs = _ptxas_report(kernel.asm["ptx"])
                print(name, "shared", shared, regs, dict(counts), flush=True)


if __name__ == "__main__":
    main()
