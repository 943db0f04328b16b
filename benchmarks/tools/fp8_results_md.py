"""Markdown tables from ``benchmarks/fp8_fwd_speed.py``'s JSON (one or more runs).

    python benchmarks/tools/fp8_results_md.py RUN.json [RUN2.json ...] > results.md
"""
import json
import sys


def fmt(value, digits=4):
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "" if value is None else str(value)


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as handle:
            run = json.load(handle)
        head = run["header"]
        print(f"### Run {head['date']} on {head['device']} (torch {head['torch']}, Triton {head['triton']})\n")
        print(f"Command: `python {head['command']}`\n")
        rows = run["rows"]
        speed = [r for r in rows if r.get("part") == "b"]
        if speed:
            print("Forward, B=16, H=4, D=128, causal, full lengths (ms: do_bench median; ratio = bf16 ms / this ms)\n")
            print("| N | impl | config | overrides | ms | TFLOP/s | vs bf16 |")
            print("|---|---|---|---|---|---|---|")
            for r in speed:
                extra = r.get("overrides", "") or (f"autotuned {r['autotuned']}" if r.get("autotuned") else "")
                if "graph_ms" in r and "vs_bf16" not in r:
                    extra = f"graph {fmt(r['graph_ms'])} ms"
                print(f"| {r['N']} | {r['impl']} | {r.get('cfg', '')} | {extra} | {fmt(r['ms'])} | "
                      f"{fmt(r.get('tflops'))} | {fmt(r.get('vs_bf16'), 3)} |")
            print()
        acc = [r for r in rows if r.get("part") == "a"]
        if acc:
            print("Forward accuracy, lengths [1000, 1, 0, 517, 256, 64, 999, 300], H=4, D=128, causal: rel-L2 "
                  "vs float64 reference (bf16 inputs), ratio to the emulation's; Triton vs emulation on fp32 inputs\n")
            print("| inputs | mode | accumulation | Triton err | emulation err | ratio | vs emulation (fp32) |")
            print("|---|---|---|---|---|---|---|")
            for r in acc:
                print(f"| {r['dist']} | {r['mode']} | {r['acc']} | {fmt(r['err_vs_ref'])} | "
                      f"{fmt(r['emu_err_vs_ref'])} | {fmt(r['ratio'], 5)} | {fmt(r['vs_emu_fp32'], 3)} |")
            print()
        quant = [r for r in rows if r.get("part") == "c"]
        if quant:
            print("Quantizers, one [65536, 4, 128] bf16 tensor (GB/s = (bytes read once + bytes written) / "
                  "time; 'moved' counts the second read of the two-pass modes 3-5; graph = CUDA-graph replay, "
                  "no host gaps)\n")
            print("| op | tuning | eager ms | eager GB/s | graph ms | graph GB/s | graph GB/s moved |")
            print("|---|---|---|---|---|---|---|")
            for r in quant:
                op = r.get("op") or f"mode {r['mode']}{' colwise' if r.get('colwise') else ''}"
                print(f"| {op} | {r.get('tuning', '')} | {fmt(r['ms'])} | {fmt(r.get('GBps'))} | "
                      f"{fmt(r.get('graph_ms'))} | {fmt(r.get('graph_GBps'))} | {fmt(r.get('graph_GBps_moved'))} |")
            print()
        fb = [r for r in rows if r.get("part") == "d"]
        if fb:
            print("Forward + backward, N=8192, B=16, H=4, D=128, causal (default accumulation)\n")
            print("| impl | ms | TFLOP/s | vs bf16 |")
            print("|---|---|---|---|")
            for r in fb:
                print(f"| {r['impl']} | {fmt(r['ms'])} | {fmt(r.get('tflops'))} | {fmt(r.get('vs_bf16'), 3)} |")
            print()
        errors = [r for r in rows if "error" in r]
        for r in errors:
            print(f"- failed: {r['case']}: {r['error']}")
        if errors:
            print()


if __name__ == "__main__":
    main()
