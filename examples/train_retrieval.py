"""Train an HSTU generative retrieval model (next-item prediction) and evaluate it.

The default run (``make train``) trains on the built-in synthetic data set (generated in code,
no download) and prints HSTU beside a most-popular and a first-order Markov baseline on the
same leave-last-out split: HR@10, NDCG@10, HR@50, NDCG@50, MRR against the full catalogue.

Examples::

    python examples/train_retrieval.py                                  # built-in data
    python examples/train_retrieval.py --data ml-1m --data-path ml-1m/ratings.dat
    python examples/train_retrieval.py --data ml-20m --data-path ml-20m/ratings.csv
    python examples/train_retrieval.py --data csv --data-path log.csv   # user,item,timestamp
    python examples/train_retrieval.py --seeds 0,1,2                    # mean and spread
    python examples/train_retrieval.py --resume                         # continue a run
    python examples/train_retrieval.py --device cuda

Outputs in ``--output-dir``: ``metrics.json``, ``training_curves.png``, ``checkpoint.pt``
(model + optimizer + epoch; ``torch.load(..., weights_only=True)``).
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (  # noqa: E402
    Throughput,
    epoch_generator,
    mean_std,
    plot_history,
    resume_run,
    run_info,
    resolve_device,
    save_checkpoint,
    seed_everything,
    write_json,
)
from tqdm import tqdm  # noqa: E402

from torchrec_hstu.data.readers import FORMATS, read_interactions  # noqa: E402
from torchrec_hstu.data.sequences import (  # noqa: E402
    RetrievalSplit,
    SequenceDataset,
    iterate_batches,
    leave_last_out,
    num_batches,
)
from torchrec_hstu.data.synthetic import RingSequenceConfig, generate_ring_sequences  # noqa: E402
from torchrec_hstu.models.baselines import FirstOrderMarkov, MostPopular  # noqa: E402
from torchrec_hstu.models.metrics import RankAccumulator  # noqa: E402
from torchrec_hstu.ops.hstu_attention import resolve_kernel  # noqa: E402
from torchrec_hstu.models.retrieval import (  # noqa: E402
    NEGATIVE_STRATEGIES,
    HSTURetrieval,
    HSTURetrievalTrain,
    sample_negatives,
)

METRIC_KEYS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=("synthetic",) + FORMATS,
                   help="built-in synthetic data, MovieLens-1M ratings.dat, MovieLens-20M ratings.csv or a user,item,timestamp CSV")
    g.add_argument("--data-path", default=None, help="input file for --data ml-1m / ml-20m / csv")
    g.add_argument("--num-users", type=int, default=RingSequenceConfig.num_users, help="synthetic: users")
    g.add_argument("--num-items", type=int, default=RingSequenceConfig.num_items, help="synthetic: catalogue size")
    g.add_argument("--num-clusters", type=int, default=RingSequenceConfig.num_clusters, help="synthetic: user clusters")
    g.add_argument("--ring-len", type=int, default=RingSequenceConfig.ring_len, help="synthetic: items per cluster ring")
    g.add_argument("--min-len", type=int, default=RingSequenceConfig.min_len, help="synthetic: shortest sequence")
    g.add_argument("--max-len", type=int, default=RingSequenceConfig.max_len, help="synthetic: longest sequence")
    g.add_argument("--noise", type=float, default=RingSequenceConfig.noise, help="synthetic: off-ring interaction probability")
    g = p.add_argument_group("model")
    g.add_argument("--config", default=None, help="HSTU transducer from a .pbtxt (torchrec_hstu.config); overrides the model flags")
    g.add_argument("--embedding-dim", type=int, default=64)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=2)
    g.add_argument("--attention-dim", type=int, default=32, help="q/k dim per head")
    g.add_argument("--hidden-dim", type=int, default=32, help="u/v dim per head")
    g.add_argument("--max-seq-len", type=int, default=200, help="keep the latest this-many interactions")
    g.add_argument("--dropout", type=float, default=0.1, help="input and STU output dropout")
    g.add_argument("--num-gap-buckets", type=int, default=32, help="gap-to-previous-interaction embedding buckets (0: off)")
    g.add_argument("--no-time-encoding", action="store_true", help="drop the positional encoder's time buckets")
    g.add_argument("--kernel", default=None,
                   help="attention kernel: auto, pytorch, triton, cutlass (default: the config's, else auto)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--num-negatives", type=int, default=256, help="shared sampled negatives per batch")
    g.add_argument("--negatives", default="uniform", choices=NEGATIVE_STRATEGIES)
    g.add_argument("--temperature", type=float, default=0.05)
    g.add_argument("--eval-batch-size", type=int, default=512)
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model, the training order and the synthetic data")
    g.add_argument("--seeds", default=None, help="comma-separated seeds: run each and report mean and spread")
    g.add_argument("--device", default="cpu", help="cpu or cuda (the item table stays on CPU, HSTU runs on the device)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch default). 1 is fastest here: the ops are small and extra threads spin-wait on busy cores")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default="runs/retrieval")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <output-dir>/checkpoint.pt)")
    g.add_argument("--results-dir", default=None, help="with --seeds: also write the table to this folder (e.g. benchmarks/results)")
    g.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    return p


def load_data(args: argparse.Namespace, seed: int) -> Tuple[SequenceDataset, Dict[str, Any]]:
    if args.data == "synthetic":
        config = RingSequenceConfig(
            num_users=args.num_users,
            num_items=args.num_items,
            num_clusters=args.num_clusters,
            ring_len=args.ring_len,
            min_len=args.min_len,
            max_len=args.max_len,
            noise=args.noise,
            seed=seed,
        )
        return generate_ring_sequences(config).dataset, {"name": "synthetic-rings", **dataclasses.asdict(config)}
    if not args.data_path:
        raise SystemExit(f"--data {args.data} needs --data-path")
    return read_interactions(args.data, args.data_path), {"name": args.data, "path": args.data_path}


def build_model(args: argparse.Namespace, num_items: int) -> HSTURetrieval:
    """From ``--config`` (the config layer's builder; its ``max_seq_len``, when set, replaces
    ``--max-seq-len``) or from the model flags."""
    if args.config:
        from torchrec_hstu.config import build_retrieval_transducer, load_config

        config = load_config(args.config)
        if config.max_seq_len:
            args.max_seq_len = config.max_seq_len
        transducer, embedding_dim = build_retrieval_transducer(config, kernel=args.kernel)
        return HSTURetrieval(
            num_items, embedding_dim=embedding_dim, transducer=transducer, num_gap_buckets=args.num_gap_buckets
        )
    return HSTURetrieval(
        num_items,
        embedding_dim=args.embedding_dim,
        num_gap_buckets=args.num_gap_buckets,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        attention_dim=args.attention_dim,
        hidden_dim=args.hidden_dim,
        max_seq_len=args.max_seq_len,
        use_time_encoding=not args.no_time_encoding,
        input_dropout_ratio=args.dropout,
        output_dropout_ratio=args.dropout,
        kernel=args.kernel or "auto",
    )


@torch.no_grad()
def evaluate(
    model: HSTURetrieval, split: RetrievalSplit, args: argparse.Namespace, desc: str = "eval"
) -> Dict[str, float]:
    """HR/NDCG@10/50 and MRR of each user's held-out last item vs the full catalogue."""
    was_training = model.training
    model.eval()
    items = model.all_item_embeddings()
    acc = RankAccumulator()
    batches = iterate_batches(split.train, args.eval_batch_size, args.max_seq_len)
    total = num_batches(split.train.num_users, args.eval_batch_size)
    for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=args.no_progress):
        users = model.user_embeddings(batch.item_ids, batch.lengths, batch.timestamps, batch.max_seq_len)
        acc.update(users @ items.t(), split.test_targets[batch.users].to(users.device))
    model.train(was_training)
    return acc.compute()


def evaluate_baselines(split: RetrievalSplit, args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    out = {}
    for baseline in (MostPopular(split.train), FirstOrderMarkov(split.train)):
        acc = RankAccumulator()
        for batch in iterate_batches(split.train, args.eval_batch_size, args.max_seq_len):
            acc.update(baseline.scores(batch), split.test_targets[batch.users])
        out[baseline.name] = acc.compute()
    return out


def format_row(name: str, metrics: Dict[str, float]) -> str:
    return f"{name:<18}" + "".join(f"{metrics[k]:>9.4f}" for k in METRIC_KEYS)


def print_table(rows: Dict[str, Dict[str, float]]) -> None:
    print(f"{'model':<18}" + "".join(f"{k:>9}" for k in METRIC_KEYS))
    for name, metrics in rows.items():
        print(format_row(name, metrics))


def run(args: argparse.Namespace, seed: int, output_dir: str) -> Dict[str, Any]:
    """Train and evaluate one seed; returns the metrics.json payload."""
    os.makedirs(output_dir, exist_ok=True)
    device = resolve_device(args.device)
    seed_everything(seed)
    dataset, data_info = load_data(args, seed)
    split = leave_last_out(dataset)
    data_info.update(
        users=split.train.num_users,
        items=dataset.num_items,
        interactions=dataset.num_interactions,
        mean_length=round(dataset.num_interactions / max(dataset.num_users, 1), 2),
    )
    print(f"data: {data_info['name']}: {split.train.num_users} users, {dataset.num_items} items, "
          f"{dataset.num_interactions} interactions; leave-last-out split")
    baselines = evaluate_baselines(split, args)

    model = build_model(args, dataset.num_items)
    if device.type == "cuda":
        # No fbgemm CUDA ops needed: the item table stays on CPU, HSTU runs on the GPU.
        model.place(device)
    train_module = HSTURetrievalTrain(model, temperature=args.temperature)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    kernels = sorted({resolve_kernel(layer.kernel, model.dense_device()).value for layer in model.transducer.stu_module.layers})
    print(f"model: HSTU retrieval, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"dense part on {model.dense_device()}, item table on {model.embedding_device()}, kernel {kernels}")

    checkpoint_path = os.path.join(output_dir, "checkpoint.pt")
    start_epoch, history = resume_run(args.resume, checkpoint_path, model, optimizer)

    meter = Throughput()
    steps = num_batches(split.train.num_users, args.batch_size)
    for epoch in range(start_epoch, args.epochs):
        generator = epoch_generator(seed, epoch)
        model.train()
        total_loss, count = 0.0, 0
        bar = tqdm(
            iterate_batches(split.train, args.batch_size, args.max_seq_len, shuffle=True, generator=generator),
            total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress,
        )
        epoch_start = time.perf_counter()
        for batch in bar:
            meter.start()
            negatives, log_q = sample_negatives(
                args.negatives, args.num_negatives, dataset.num_items, batch.item_ids, generator
            )
            loss = train_module(batch.item_ids, batch.lengths, batch.timestamps, batch.max_seq_len, negatives, log_q)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            meter.stop(batch.batch_size, batch.num_tokens)
            total_loss += value
            count += 1
            bar.set_postfix(loss=f"{value:.3f}")
        record: Dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": total_loss / max(count, 1),
            "train_seconds": round(time.perf_counter() - epoch_start, 2),
        }
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            record["metrics"] = evaluate(model, split, args)
            tqdm.write(f"epoch {epoch + 1}: loss {record['loss']:.4f}  " + "  ".join(
                f"{k} {record['metrics'][k]:.4f}" for k in METRIC_KEYS))
        else:
            tqdm.write(f"epoch {epoch + 1}: loss {record['loss']:.4f}")
        history.append(record)
        save_checkpoint(checkpoint_path, model, optimizer, epoch + 1, history, vars(args))

    evaluated = [h for h in history if "metrics" in h]
    final = evaluated[-1]["metrics"] if evaluated else evaluate(model, split, args)
    print()
    print_table({"HSTU": final, **baselines})
    best_name = max(baselines, key=lambda n: baselines[n]["HR@10"])
    lift = {k: final[k] / baselines[best_name][k] - 1.0 for k in ("HR@10", "NDCG@10") if baselines[best_name][k] > 0}
    print(f"relative to {best_name}: " + ", ".join(f"{k} {v:+.1%}" for k, v in lift.items()))
    throughput = meter.summary()
    if throughput["sequences"]:
        print(f"training throughput: {throughput['sequences_per_s']:.1f} sequences/s, "
              f"{throughput['tokens_per_s']:.1f} tokens/s ({throughput['seconds']:.1f} s in training steps)")

    payload = {
        "run": run_info(device),
        "seed": seed,
        "args": {k: v for k, v in vars(args).items()},
        "data": data_info,
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "kernel": kernels},
        "baselines": baselines,
        "final": final,
        "relative_to_best_baseline": {"baseline": best_name, **lift},
        "history": history,
        "throughput": throughput,
    }
    write_json(os.path.join(output_dir, "metrics.json"), payload)
    if evaluated:
        plot_history(
            os.path.join(output_dir, "training_curves.png"), evaluated, ("HR@10", "NDCG@10", "HR@50", "MRR"),
            baselines={"popular": baselines["most-popular"], "markov": baselines["markov-1st-order"]},
            title=f"HSTU retrieval on {data_info['name']} (seed {seed})",
        )
    print(f"wrote {output_dir}/metrics.json, training_curves.png, checkpoint.pt")
    return payload


def summarize_seeds(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and spread over seeds of HSTU and the baselines, and HSTU's lift."""
    rows: Dict[str, Dict[str, Dict[str, float]]] = {}
    names = ["HSTU"] + list(runs[0]["baselines"])
    for name in names:
        per_seed = [r["final"] if name == "HSTU" else r["baselines"][name] for r in runs]
        rows[name] = {k: mean_std([m[k] for m in per_seed]) for k in METRIC_KEYS}
    lifts = {}
    for key in ("HR@10", "NDCG@10"):
        best = [max(r["baselines"][n][key] for n in r["baselines"]) for r in runs]
        per_seed = [r["final"][key] / b - 1.0 for r, b in zip(runs, best)]
        mean_best = sum(best) / len(best)
        lifts[key] = {"per_seed": per_seed, "of_means": rows["HSTU"][key]["mean"] / mean_best - 1.0}
    return {"seeds": [r["seed"] for r in runs], "rows": rows, "lift_vs_best_baseline": lifts}


def summary_markdown(summary: Dict[str, Any], runs: List[Dict[str, Any]]) -> str:
    first = runs[0]
    lines = [
        f"# HSTU retrieval vs baselines, {len(runs)} seeds",
        "",
        f"- date: {first['run']['date']}",
        f"- device: {first['run']['device']}",
        f"- command: `{first['run']['command']}`",
        f"- data: {first['data']['name']} ({first['data']['users']} users, {first['data']['items']} items, "
        f"{first['data']['interactions']} interactions per seed); the seed sets the data, the model init and the order",
        "",
        "Mean ± std over seeds " + ", ".join(str(s) for s in summary["seeds"]) + " (min–max in brackets):",
        "",
        "| model | " + " | ".join(METRIC_KEYS) + " |",
        "|---|" + "---|" * len(METRIC_KEYS),
    ]
    for name, row in summary["rows"].items():
        cells = [f"{row[k]['mean']:.4f} ± {row[k]['std']:.4f} [{row[k]['min']:.4f}–{row[k]['max']:.4f}]" for k in METRIC_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, lift in summary["lift_vs_best_baseline"].items():
        per_seed = ", ".join(f"{v:+.1%}" for v in lift["per_seed"])
        lines.append(f"- HSTU {key} vs the better baseline: {lift['of_means']:+.1%} (of means; per seed {per_seed})")
    seconds = [r["throughput"]["seconds"] for r in runs]
    tps = [r["throughput"]["tokens_per_s"] for r in runs]
    lines.append(f"- training time per seed: {', '.join(f'{s:.0f} s' for s in seconds)}; "
                 f"throughput {', '.join(f'{t:.0f}' for t in tps)} tokens/s")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.seeds is None:
        return run(args, args.seed, args.output_dir)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.resume:
        raise SystemExit("--resume works on a single run; not with --seeds")
    runs = []
    for seed in seeds:
        print(f"\n=== seed {seed} ===")
        runs.append(run(args, seed, os.path.join(args.output_dir, f"seed{seed}")))
    summary = summarize_seeds(runs)
    markdown = summary_markdown(summary, runs)
    print("\n" + markdown)
    write_json(os.path.join(args.output_dir, "seeds_summary.json"), {"summary": summary, "runs": runs})
    with open(os.path.join(args.output_dir, "seeds_summary.md"), "w") as f:
        f.write(markdown)
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        device = "cuda" if args.device.startswith("cuda") else "cpu"
        stem = os.path.join(args.results_dir, f"{time.strftime('%Y-%m-%d')}-{device}-retrieval-synthetic-{len(seeds)}seeds")
        write_json(stem + ".json", {"summary": summary, "runs": runs})
        with open(stem + ".md", "w") as f:
            f.write(markdown)
        print(f"wrote {stem}.md / .json")
    return {"summary": summary, "runs": runs}


if __name__ == "__main__":
    main()
