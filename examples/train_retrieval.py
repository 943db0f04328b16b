"""Train an HSTU generative retrieval model (next-item prediction) and evaluate it.

The default run (``make train``) trains on the built-in synthetic data set (generated in code,
no download) and prints HSTU beside a most-popular and a first-order Markov baseline on the
same leave-last-out split: HR@10, NDCG@10, HR@50, NDCG@50, MRR against the full catalogue.

Examples::

    python examples/train_retrieval.py                                  # built-in data
    python examples/train_retrieval.py --data ml-100k --data-path u.data --recipe ml-100k \
        --model hstu,sasrec --seeds 0,1,2                               # MovieLens-100K benchmark
    python examples/train_retrieval.py --data ml-1m --data-path ml-1m/ratings.dat
    python examples/train_retrieval.py --data ml-20m --data-path ml-20m/ratings.csv
    python examples/train_retrieval.py --data csv --data-path log.csv   # user,item,timestamp
    python examples/train_retrieval.py --seeds 0,1,2                    # mean and spread
    python examples/train_retrieval.py --resume                         # continue a run
    python examples/train_retrieval.py --device cuda

Models: ``--model hstu`` (default) or ``sasrec`` (the causal softmax-attention baseline), or a
comma list: each is trained on the same split and reported beside the non-neural baselines.
``--eval-split valid`` holds out each user's second-to-last item instead of the last (train on
the rest): choose hyperparameters there, never on the test items. ``--recipe ml-100k`` sets the
hyperparameters chosen that way for each model (flags given on the command line win).

Outputs in ``--output-dir``: ``metrics.json``, ``training_curves.png``, ``checkpoint.pt``
(model + optimizer + epoch + the run's arguments and data fingerprint;
``torch.load(..., weights_only=True)``). ``--resume`` refuses a checkpoint of another run
(other arguments or data) unless ``--resume-anyway``.

A user error (bad input file, bad checkpoint, bad argument) ends with one line
``error: ...`` on stderr and exit status 2; ``--debug`` (or ``TORCHREC_HSTU_DEBUG=1``) shows the
traceback.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (  # noqa: E402
    Throughput,
    data_fingerprint,
    epoch_generator,
    mean_std,
    plot_history,
    resolve_device,
    resume_run,
    run_info,
    save_checkpoint,
    seed_everything,
    write_json,
)
from tqdm import tqdm  # noqa: E402

from torchrec_hstu.cli import UserError, add_debug_flag, run_cli  # noqa: E402
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
from torchrec_hstu.models.retrieval import (  # noqa: E402
    NEGATIVE_STRATEGIES,
    HSTURetrieval,
    HSTURetrievalTrain,
    SequentialRetrieval,
    sample_negatives,
)
from torchrec_hstu.models.sasrec import SASRecRetrieval  # noqa: E402
from torchrec_hstu.ops.hstu_attention import resolve_kernel  # noqa: E402

METRIC_KEYS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR")
#: --model choice -> row name in the tables.
MODEL_NAMES = {"hstu": "HSTU", "sasrec": "SASRec"}
#: Arguments a resumed run may change (everything else must match the checkpoint's).
RESUME_FREE_ARGS = (
    "epochs", "output_dir", "resume", "resume_anyway", "no_progress", "threads", "eval_batch_size",
    "eval_every", "results_dir", "device", "kernel", "seeds",
)
#: Hyperparameters per data set and model, chosen on the validation split (--eval-split valid)
#: with the same search budget for each model (benchmarks/results/2026-12-02-cpu-retrieval-ml-100k-*.md).
_ML100K_COMMON: Dict[str, Any] = dict(
    embedding_dim=50, num_layers=2, num_heads=1, max_seq_len=200, dropout=0.3, loss="full",
    batch_size=32, lr=2e-3, temperature=0.05, shift_inputs=True, label_smoothing=0.1, epochs=30,
)
RECIPES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "ml-100k": {
        # Chosen by the mean HR@10 + NDCG@10 of three consecutive validation evaluations (every
        # 3 epochs; the epoch count is the best such window's last epoch); the fourth search
        # (label smoothing 0.1 for both models, and the epoch counts) on the validation curves
        # averaged over seeds 0 and 1 of 48-epoch runs. HSTU adds the gap-to-previous-interaction
        # embedding beside GR's time buckets (--no-time-encoding drops those: no measurable
        # difference) and scales q k^T by 1, as GR's research HSTU (the default
        # 1/sqrt(attention_dim) is GR's production STU's). The sixth search (depth, 4 layers for
        # each model, same rule, two seeds) took 4 layers for SASRec (36 epochs), not for HSTU.
        # The eighth search re-ran the last contested choice of each model with seed 2 and read
        # the rule on three-seed curves: both choices stand (HSTU label smoothing, SASRec 4
        # layers); the epoch counts re-read there are HSTU 39 (unchanged), SASRec 45. The ninth
        # search (softmax temperature 0.03 / 0.1 / 0.2 / 0.4 for each model on seed 0, the best
        # on seeds 1 and 2, the same rule on three seeds) took 0.2 and 45 epochs for HSTU;
        # SASRec's best, 0.1, tied its 0.05 and was not taken.
        "hstu": dict(_ML100K_COMMON, attention_dim=50, hidden_dim=50, num_gap_buckets=32, attn_alpha=1.0,
                     temperature=0.2, epochs=45),
        "sasrec": dict(_ML100K_COMMON, embedding_dim=64, lr=4e-3, num_layers=4, epochs=45),
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=("synthetic",) + FORMATS,
                   help="built-in synthetic data, MovieLens-1M ratings.dat, MovieLens-20M ratings.csv or a user,item,timestamp CSV")
    g.add_argument("--data-path", default=None, help="input file for --data ml-100k / ml-1m / ml-20m / csv")
    g.add_argument("--eval-split", default="test", choices=("test", "valid"),
                   help="test: hold out each user's last item; valid: the second-to-last (train on the rest; for tuning)")
    g.add_argument("--num-users", type=int, default=RingSequenceConfig.num_users, help="synthetic: users")
    g.add_argument("--num-items", type=int, default=RingSequenceConfig.num_items, help="synthetic: catalogue size")
    g.add_argument("--num-clusters", type=int, default=RingSequenceConfig.num_clusters, help="synthetic: user clusters")
    g.add_argument("--ring-len", type=int, default=RingSequenceConfig.ring_len, help="synthetic: items per cluster ring")
    g.add_argument("--min-len", type=int, default=RingSequenceConfig.min_len, help="synthetic: shortest sequence")
    g.add_argument("--max-len", type=int, default=RingSequenceConfig.max_len, help="synthetic: longest sequence")
    g.add_argument("--noise", type=float, default=RingSequenceConfig.noise, help="synthetic: off-ring interaction probability")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="hstu",
                   help="hstu or sasrec, or a comma list (each trained on the same split, reported side by side)")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="per-model hyperparameters chosen on the validation split; explicit flags win")
    g.add_argument("--config", default=None, help="HSTU transducer from a .pbtxt (torchrec_hstu.config); overrides the model flags")
    g.add_argument("--embedding-dim", type=int, default=64)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=2)
    g.add_argument("--attention-dim", type=int, default=32, help="q/k dim per head")
    g.add_argument("--hidden-dim", type=int, default=32, help="u/v dim per head")
    g.add_argument("--max-seq-len", type=int, default=200, help="keep the latest this-many interactions")
    g.add_argument("--dropout", type=float, default=0.1, help="input and STU output dropout (SASRec: every dropout)")
    g.add_argument("--num-gap-buckets", type=int, default=32, help="gap-to-previous-interaction embedding buckets (0: off)")
    g.add_argument("--no-time-encoding", action="store_true", help="drop the positional encoder's time buckets")
    g.add_argument("--relative-attention-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="HSTU: the paper's relative position + time attention bias in every layer (dense PyTorch attention)")
    g.add_argument("--attn-alpha", type=float, default=None, help="HSTU: scale of q k^T (default 1/sqrt(attention dim))")
    g.add_argument("--uvqk-activation", default="u", choices=("u", "all"),
                   help="HSTU: silu on u only (GR's production STU) or on all of u, v, q, k (GR's research HSTU)")
    g.add_argument("--kernel", default=None,
                   help="attention kernel: auto, pytorch, triton, cutlass (default: the config's, else auto)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW's decoupled weight decay (>= 0), on every parameter, the item table included")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the next-item cross-entropy, in [0, 1); needs --loss full")
    g.add_argument("--item-dropout", type=float, default=0.0,
                   help="item-embedding dropout, in [0, 1): each input token's whole item embedding is zeroed "
                        "with this probability in training (its position and time stay); with --loss sampled "
                        "it needs --shift-inputs")
    g.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                   help="cosine: decay to 0 over all steps after --warmup-steps of linear warm-up")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    g.add_argument("--loss", default="sampled", choices=("sampled", "full"),
                   help="sampled softmax (--num-negatives shared negatives) or full softmax over the catalogue")
    g.add_argument("--num-negatives", type=int, default=256, help="shared sampled negatives per batch")
    g.add_argument("--negatives", default="uniform", choices=NEGATIVE_STRATEGIES)
    g.add_argument("--temperature", type=float, default=0.05)
    g.add_argument("--shift-inputs", action=argparse.BooleanOptionalAction, default=False,
                   help="train on each sequence without its last item, so every position the model reads is "
                        "supervised, including the last one, which evaluation scores from")
    g.add_argument("--eval-batch-size", type=int, default=512)
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model, the training order and the synthetic data")
    g.add_argument("--seeds", default=None, help="comma-separated seeds: run each and report mean and spread")
    g.add_argument("--device", default="cpu", help="cpu or cuda (the item table stays on CPU, HSTU runs on the device)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch default). 1 is fastest here: the ops are small and extra "
                        "threads spin-wait on busy cores")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default="runs/retrieval")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <output-dir>/checkpoint.pt)")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume even if the checkpoint's arguments or data fingerprint differ from this run's")
    g.add_argument("--results-dir", default=None,
                   help="with --seeds: also write the table to this folder (e.g. benchmarks/results)")
    g.add_argument("--merge", default=None,
                   help="comma list of seeds_summary.json files of runs made in parallel (same data and split): "
                        "write their combined table to --output-dir (and --results-dir) instead of training")
    g.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    add_debug_flag(p)
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
        raise UserError(f"--data {args.data} needs --data-path FILE")
    return read_interactions(args.data, args.data_path), {"name": args.data, "path": args.data_path}


def make_split(dataset: SequenceDataset, args: argparse.Namespace) -> RetrievalSplit:
    """Leave-last-out on the test item, or (``--eval-split valid``) on the second-to-last item
    with the last one dropped; refuses data with no user left to evaluate."""
    split = leave_last_out(dataset)
    if args.eval_split == "valid":
        split = leave_last_out(split.train)
    if split.train.num_users == 0:
        needed = 2 if args.eval_split == "test" else 3
        where = f"--data-path {args.data_path}" if args.data != "synthetic" else "--data synthetic"
        raise UserError(
            f"{where}: no user has at least {needed} interactions ({dataset.num_users} users, "
            f"{dataset.num_interactions} interactions); leave-last-out with --eval-split {args.eval_split} "
            f"needs {needed} per user to keep a history and hold one out"
        )
    return split


def check_training_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range regularization flags with one user error (before any data is read)."""
    if not math.isfinite(args.weight_decay) or args.weight_decay < 0:
        raise UserError(f"--weight-decay must be a finite number >= 0; got {args.weight_decay}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must be in [0, 1); got {args.label_smoothing}")
    if args.label_smoothing > 0 and args.loss != "full":
        raise UserError("--label-smoothing needs --loss full (the sampled softmax masks accidental hits with -inf)")
    if not 0.0 <= args.item_dropout < 1.0:
        raise UserError(f"--item-dropout must be in [0, 1); got {args.item_dropout}")
    if args.item_dropout > 0 and args.loss == "sampled" and not args.shift_inputs:
        raise UserError("--item-dropout with --loss sampled needs --shift-inputs (the unshifted sampled softmax "
                        "takes its positives from the input embeddings, which the dropout zeroes)")


def build_model(args: argparse.Namespace, num_items: int) -> SequentialRetrieval:
    """HSTU from ``--config`` (the config layer's builder; its ``max_seq_len``, when set,
    replaces ``--max-seq-len``) or from the model flags; SASRec from the model flags."""
    if args.model == "sasrec":
        if args.config:
            raise UserError("--config describes an HSTU transducer; it does not apply to --model sasrec")
        return SASRecRetrieval(
            num_items,
            embedding_dim=args.embedding_dim,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            max_seq_len=args.max_seq_len,
            dropout_ratio=args.dropout,
        )
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
        relative_attention_bias=args.relative_attention_bias,
        attn_alpha=args.attn_alpha,
        uvqk_activation=args.uvqk_activation,
    )


@torch.no_grad()
def evaluate(
    model: SequentialRetrieval, split: RetrievalSplit, args: argparse.Namespace, desc: str = "eval"
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


def learning_rate(args: argparse.Namespace, step: int, total_steps: int) -> float:
    """``--lr`` at global ``step`` under ``--lr-schedule`` / ``--warmup-steps`` (a pure function
    of the step, so a resumed run follows the same schedule)."""
    if args.warmup_steps > 0 and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(total_steps - args.warmup_steps, 1)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def run(args: argparse.Namespace, seed: int, output_dir: str) -> Dict[str, Any]:
    """Train and evaluate one seed; returns the metrics.json payload."""
    os.makedirs(output_dir, exist_ok=True)
    device = resolve_device(args.device)
    seed_everything(seed)
    dataset, data_info = load_data(args, seed)
    split = make_split(dataset, args)
    data_info.update(
        users=split.train.num_users,
        items=dataset.num_items,
        interactions=dataset.num_interactions,
        mean_length=round(dataset.num_interactions / max(dataset.num_users, 1), 2),
    )
    print(f"data: {data_info['name']}: {split.train.num_users} users, {dataset.num_items} items, "
          f"{dataset.num_interactions} interactions; leave-last-out split, evaluated on the "
          f"{'last' if args.eval_split == 'test' else 'second-to-last (validation)'} item")
    baselines = evaluate_baselines(split, args)

    model = build_model(args, dataset.num_items)
    if device.type == "cuda":
        # No fbgemm CUDA ops needed: the item table stays on CPU, HSTU runs on the GPU.
        model.place(device)
    model.set_item_dropout(args.item_dropout)
    train_module = HSTURetrievalTrain(
        model, temperature=args.temperature, shift_inputs=args.shift_inputs, label_smoothing=args.label_smoothing
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model_name = MODEL_NAMES[args.model]
    if isinstance(model, HSTURetrieval):
        kernels = sorted({resolve_kernel(layer.kernel, model.dense_device()).value
                          for layer in model.transducer.stu_module.layers})
    else:
        kernels = ["SDPA"]
    print(f"model: {model_name} retrieval, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"dense part on {model.dense_device()}, item table on {model.embedding_device()}, kernel {kernels}")

    checkpoint_path = os.path.join(output_dir, "checkpoint.pt")
    fingerprint = data_fingerprint(split.train.item_ids, split.train.timestamps, split.train.offsets, split.test_targets)
    start_epoch, history = resume_run(
        args.resume, checkpoint_path, model, optimizer, run_args={**vars(args), "seed": seed},
        fingerprint=fingerprint, free_args=RESUME_FREE_ARGS, resume_anyway=args.resume_anyway,
    )

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
        for step, batch in enumerate(bar):
            meter.start()
            if args.lr_schedule != "constant" or args.warmup_steps > 0:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(args, epoch * steps + step, args.epochs * steps)
            if args.loss == "full":
                negatives, log_q = None, None
            else:
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
        save_checkpoint(checkpoint_path, model, optimizer, epoch + 1, history, {**vars(args), "seed": seed}, fingerprint)

    evaluated = [h for h in history if "metrics" in h]
    final = evaluated[-1]["metrics"] if evaluated else evaluate(model, split, args)
    print()
    print_table({model_name: final, **baselines})
    best_name = max(baselines, key=lambda n: baselines[n]["HR@10"])
    lift = {k: final[k] / baselines[best_name][k] - 1.0 for k in ("HR@10", "NDCG@10") if baselines[best_name][k] > 0}
    print(f"{model_name} relative to {best_name}: " + ", ".join(f"{k} {v:+.1%}" for k, v in lift.items()))
    throughput = meter.summary()
    if throughput["sequences"]:
        print(f"training throughput: {throughput['sequences_per_s']:.1f} sequences/s, "
              f"{throughput['tokens_per_s']:.1f} tokens/s ({throughput['seconds']:.1f} s in training steps)")

    payload = {
        "run": run_info(device),
        "seed": seed,
        "args": {k: v for k, v in vars(args).items()},
        "data": data_info,
        "model": {"name": model_name, "parameters": sum(p.numel() for p in model.parameters()), "kernel": kernels},
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
            title=f"{model_name} retrieval on {data_info['name']} (seed {seed}, {args.eval_split} split)",
            model_name=model_name,
        )
    print(f"wrote {output_dir}/metrics.json, training_curves.png, checkpoint.pt")
    return payload


def summarize_seeds(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean and spread over seeds of each model and the baselines, and each model's lift.

    Args:
        runs: ``run`` payloads, one per (seed, model); the baselines are those of the first
            model's runs (every model of a seed sees the same split).
    """
    names = list(dict.fromkeys(r["model"]["name"] for r in runs))
    by_model = {name: [r for r in runs if r["model"]["name"] == name] for name in names}
    reference = by_model[names[0]]
    rows: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name in names:
        rows[name] = {k: mean_std([r["final"][k] for r in by_model[name]]) for k in METRIC_KEYS}
    for baseline in reference[0]["baselines"]:
        rows[baseline] = {k: mean_std([r["baselines"][baseline][k] for r in reference]) for k in METRIC_KEYS}
    lifts: Dict[str, Dict[str, Any]] = {}
    for name in names:
        for key in ("HR@10", "NDCG@10"):
            best = [max(r["baselines"][n][key] for n in r["baselines"]) for r in by_model[name]]
            per_seed = [r["final"][key] / b - 1.0 for r, b in zip(by_model[name], best)]
            mean_best = sum(best) / len(best)
            lifts.setdefault(name, {})[key] = {"per_seed": per_seed, "of_means": rows[name][key]["mean"] / mean_best - 1.0}
    return {
        "seeds": [r["seed"] for r in reference],
        "models": names,
        "rows": rows,
        "lift_vs_best_baseline": lifts[names[0]],
        "lift_vs_best_baseline_by_model": lifts,
    }


def summary_markdown(summary: Dict[str, Any], runs: List[Dict[str, Any]]) -> str:
    """The seeds table as markdown: date, machine, command, git commit, data, rows, lifts."""
    first = runs[0]
    models = summary["models"]
    lines = [
        f"# {' and '.join(models)} retrieval vs baselines, {len(summary['seeds'])} seeds",
        "",
        f"- date: {first['run']['date']}",
        f"- device: {first['run']['device']}",
        *[f"- command: `{command}`" for command in dict.fromkeys(r["run"]["command"] for r in runs)],
        f"- git commit: {', '.join(dict.fromkeys(r['run'].get('git_commit') or '(unknown)' for r in runs))}",
        f"- data: {first['data']['name']} ({first['data']['users']} users, {first['data']['items']} items, "
        f"{first['data']['interactions']} interactions per seed); evaluated on each user's "
        f"{'last' if first['args'].get('eval_split', 'test') == 'test' else 'second-to-last (validation)'} item "
        "against the full catalogue; "
        + ("the seed sets the data, the model init and the order" if first["data"]["name"] == "synthetic-rings"
           else "the seed sets the model init, the training order, dropout and sampled negatives"),
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
    for name, by_key in summary["lift_vs_best_baseline_by_model"].items():
        for key, lift in by_key.items():
            per_seed = ", ".join(f"{v:+.1%}" for v in lift["per_seed"])
            lines.append(f"- {name} {key} vs the better baseline: {lift['of_means']:+.1%} (of means; per seed {per_seed})")
    if len(models) > 1:
        first_name, rows = models[0], summary["rows"]
        for other in models[1:]:
            ratios = ", ".join(f"{k} {rows[first_name][k]['mean'] / rows[other][k]['mean'] - 1.0:+.1%}"
                               for k in ("HR@10", "NDCG@10") if rows[other][k]["mean"] > 0)
            lines.append(f"- {first_name} vs {other} (of means): {ratios}")
    for name in models:
        mine = [r for r in runs if r["model"]["name"] == name]
        seconds = [r["throughput"]["seconds"] for r in mine]
        tps = [r["throughput"]["tokens_per_s"] for r in mine]
        lines.append(f"- {name} training time per seed: {', '.join(f'{s:.0f} s' for s in seconds)}; "
                     f"throughput {', '.join(f'{t:.0f}' for t in tps)} tokens/s")
    return "\n".join(lines) + "\n"


def model_args(argv: Optional[Sequence[str]], model: str, recipe: Optional[str]) -> argparse.Namespace:
    """The arguments of one ``--model`` entry: the recipe's values for that model as defaults,
    the command line on top."""
    parser = build_parser()
    if recipe:
        parser.set_defaults(**RECIPES[recipe][model])
    args = parser.parse_args(argv)
    args.model = model
    check_training_args(args)
    return args


def parse_models(text: str) -> List[str]:
    models = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_NAMES]
    if not models or unknown:
        raise UserError(f"--model must be one or more of {', '.join(MODEL_NAMES)} separated by commas; got {text!r}")
    if len(set(models)) != len(models):
        raise UserError(f"--model lists a model twice: {text!r}")
    return models


def parse_seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers such as 0,1,2; got {text!r}") from None
    if not seeds:
        raise UserError(f"--seeds must list at least one integer; got {text!r}")
    return seeds


def write_summary(args: argparse.Namespace, runs: List[Dict[str, Any]], num_seeds: int) -> Dict[str, Any]:
    """Summarize ``runs``, print the table and write it to ``--output-dir`` (and ``--results-dir``)."""
    summary = summarize_seeds(runs)
    markdown = summary_markdown(summary, runs)
    print("\n" + markdown)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "seeds_summary.json"), {"summary": summary, "runs": runs})
    with open(os.path.join(args.output_dir, "seeds_summary.md"), "w") as f:
        f.write(markdown)
    if args.results_dir:
        os.makedirs(args.results_dir, exist_ok=True)
        first = runs[0]
        device = "cuda" if first["args"]["device"].startswith("cuda") else "cpu"
        data = "synthetic" if first["args"]["data"] == "synthetic" else first["args"]["data"]
        split = "" if first["args"].get("eval_split", "test") == "test" else "-valid"
        stem = os.path.join(args.results_dir, f"{time.strftime('%Y-%m-%d')}-{device}-retrieval-{data}{split}-{num_seeds}seeds")
        write_json(stem + ".json", {"summary": summary, "runs": runs})
        with open(stem + ".md", "w") as f:
            f.write(markdown)
        print(f"wrote {stem}.md / .json")
    return {"summary": summary, "runs": runs}


def merge_summaries(args: argparse.Namespace) -> Dict[str, Any]:
    """``--merge``: one table from runs of the same data and split made in separate processes."""
    runs: List[Dict[str, Any]] = []
    for path in [p.strip() for p in args.merge.split(",") if p.strip()]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--merge: file not found: {path}")
        with open(path) as f:
            runs.extend(json.load(f)["runs"])
    keys = {(r["data"]["name"], r["data"].get("path"), r["args"].get("eval_split", "test")) for r in runs}
    if len(keys) != 1:
        raise UserError(f"--merge: the runs must share data and split; got {sorted(map(str, keys))}")
    return write_summary(args, runs, len({r["seed"] for r in runs}))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.merge:
        return merge_summaries(args)
    models = parse_models(args.model)
    per_model = {m: model_args(argv, m, args.recipe) for m in models}
    if args.seeds is None and len(models) == 1:
        return run(per_model[models[0]], args.seed, args.output_dir)
    seeds = [args.seed] if args.seeds is None else parse_seeds(args.seeds)
    if args.resume:
        raise UserError("--resume works on a single run of one model; not with --seeds or several --model")
    runs = []
    for seed in seeds:
        for m in models:
            print(f"\n=== seed {seed}, {MODEL_NAMES[m]} ===")
            output_dir = os.path.join(args.output_dir, f"seed{seed}")
            if len(models) > 1:
                output_dir = os.path.join(output_dir, m)
            runs.append(run(per_model[m], seed, output_dir))
    return write_summary(args, runs, len(seeds))


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` for the command line: status 0 after a run (see :func:`torchrec_hstu.cli.run_cli`)."""
    main(argv)
    return 0


if __name__ == "__main__":
    run_cli(cli)
