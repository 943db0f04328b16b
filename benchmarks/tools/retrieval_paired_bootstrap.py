"""Is one retrieval model better than another, or is it seed noise? A paired bootstrap over users.

Reloads the final checkpoints of finished ``examples/train_retrieval.py`` runs (one folder per
seed, each holding ``checkpoint.pt`` with the run's arguments), ranks every user's held-out item
against the full catalogue again, averages each user's HR@10 / NDCG@10 over the seeds, and
resamples users (with replacement, the same users for both models) to give a confidence interval
of the difference of the means, and of the ratio to the first-order Markov chain.

    python benchmarks/tools/retrieval_paired_bootstrap.py --data-path runs/data/ml-100k/MovieLens100k_data.parquet.brotli \\
        --a runs/ml-100k-hstu/seed0,runs/ml-100k-hstu/seed1,runs/ml-100k-hstu/seed2 \\
        --b runs/ml-100k-sasrec/seed0,runs/ml-100k-sasrec/seed1,runs/ml-100k-sasrec-s2/seed2
"""

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")
sys.path.insert(0, EXAMPLES)
sys.path.insert(0, os.path.join(EXAMPLES, ".."))

from common import load_checkpoint  # noqa: E402
from train_retrieval import build_model, build_parser, load_data, make_split  # noqa: E402

from torchrec_hstu.data.sequences import iterate_batches  # noqa: E402
from torchrec_hstu.models.baselines import FirstOrderMarkov  # noqa: E402
from torchrec_hstu.models.metrics import target_ranks  # noqa: E402


def per_user_metrics(ranks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """HR@10 and NDCG@10 of each user from 0-based ranks (float64 ``[U]`` each)."""
    ranks = ranks.to(torch.float64)
    hit = ranks < 10
    return {"HR@10": hit.double(),
            "NDCG@10": torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))}


@torch.no_grad()
def run_ranks(run_dir: str, data_path: str) -> torch.Tensor:
    """Every user's test-item rank under the model saved in ``run_dir`` (``[U]``, user order)."""
    state = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    # Flags added after a run was saved take their defaults, which keep the earlier behaviour.
    args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **state["args"]})
    args.data_path = data_path
    dataset, _ = load_data(args, args.seed)
    split = make_split(dataset, args)
    model = build_model(args, dataset.num_items)
    model.load_state_dict(state["model"])
    model.eval()
    items = model.all_item_embeddings()
    ranks = torch.full((split.train.num_users,), -1, dtype=torch.int64)
    for batch in iterate_batches(split.train, args.eval_batch_size, args.max_seq_len):
        users = model.user_embeddings(batch.item_ids, batch.lengths, batch.timestamps, batch.max_seq_len)
        ranks[batch.users] = target_ranks(users @ items.t(), split.test_targets[batch.users]).cpu()
    assert (ranks >= 0).all(), run_dir
    return ranks


def markov_ranks(run_dir: str, data_path: str) -> torch.Tensor:
    state = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    # Flags added after a run was saved take their defaults, which keep the earlier behaviour.
    args = argparse.Namespace(**{**vars(build_parser().parse_args([])), **state["args"]})
    args.data_path = data_path
    split = make_split(load_data(args, args.seed)[0], args)
    markov = FirstOrderMarkov(split.train)
    ranks = torch.full((split.train.num_users,), -1, dtype=torch.int64)
    for batch in iterate_batches(split.train, args.eval_batch_size, args.max_seq_len):
        ranks[batch.users] = target_ranks(markov.scores(batch), split.test_targets[batch.users])
    return ranks


def seed_mean(runs: List[str], data_path: str) -> Dict[str, torch.Tensor]:
    per_seed = [per_user_metrics(run_ranks(run, data_path)) for run in runs]
    return {k: torch.stack([m[k] for m in per_seed]).mean(0) for k in per_seed[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--a", required=True, help="comma-separated run folders of model A (one per seed)")
    parser.add_argument("--b", required=True, help="comma-separated run folders of model B")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    runs_a, runs_b = args.a.split(","), args.b.split(",")
    a, b = seed_mean(runs_a, args.data_path), seed_mean(runs_b, args.data_path)
    markov = per_user_metrics(markov_ranks(runs_a[0], args.data_path))
    users = a["HR@10"].numel()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, users, (args.resamples, users), generator=gen)
    result: Dict[str, Dict[str, float]] = {}
    for key in ("HR@10", "NDCG@10"):
        diff = (a[key] - b[key])[idx].mean(1)
        ratio = a[key][idx].mean(1) / markov[key][idx].mean(1)
        lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        rlo, rhi = torch.quantile(ratio, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        result[key] = dict(a=a[key].mean().item(), b=b[key].mean().item(), markov=markov[key].mean().item(),
                           a_minus_b=(a[key] - b[key]).mean().item(), a_minus_b_ci95=[lo, hi],
                           p_a_below_b=(diff < 0).double().mean().item(),
                           a_over_markov=(a[key].mean() / markov[key].mean()).item(), a_over_markov_ci95=[rlo, rhi])
        print(f"{key}: A {result[key]['a']:.4f}  B {result[key]['b']:.4f}  A-B {result[key]['a_minus_b']:+.4f} "
              f"[95% CI {lo:+.4f}, {hi:+.4f}], P(A<B) {result[key]['p_a_below_b']:.3f};  "
              f"A/Markov {result[key]['a_over_markov']:.3f} [{rlo:.3f}, {rhi:.3f}]")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(users=users, runs_a=runs_a, runs_b=runs_b, resamples=args.resamples, **result), handle,
                      indent=1)


if __name__ == "__main__":
    main()
