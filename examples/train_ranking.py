"""Train a DLRM-HSTU style multi-task ranker on a built-in synthetic impression log.

Each user has a history of impressions (with click / long-view actions) and ``C`` candidate
impressions appended (``num_targets``); the STU layers are target-aware (a candidate sees the
history and itself). Two history channels (Mixture of Transducers: clicked items and
long-viewed items by default) come from a ``.pbtxt`` (``--config``), per-task heads are trained
with BCE, and AUC per task (torchmetrics) is printed beside an item-CTR baseline and the
oracle (the generator's true probabilities).

Examples::

    python examples/train_ranking.py
    python examples/train_ranking.py --config examples/configs/ranking_two_channel.pbtxt
    python examples/train_ranking.py --config none --channels uih    # one channel, flags
    python examples/train_ranking.py --resume --epochs 20

Outputs in ``--output-dir``: ``metrics.json``, ``training_curves.png``, ``checkpoint.pt``.
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (  # noqa: E402
    Throughput,
    epoch_generator,
    plot_history,
    resolve_device,
    resume_run,
    run_info,
    save_checkpoint,
    seed_everything,
    write_json,
)
from torchmetrics.classification import BinaryAUROC  # noqa: E402
from tqdm import tqdm  # noqa: E402

from torchrec_hstu.cli import UserError, add_debug_flag, run_cli  # noqa: E402
from torchrec_hstu.data.ranking import (  # noqa: E402
    CHANNEL_ACTION_FILTERS,
    DEFAULT_TASKS,
    iterate_ranking_batches,
    split_users,
)
from torchrec_hstu.data.sequences import num_batches  # noqa: E402
from torchrec_hstu.data.synthetic import ImpressionConfig, Impressions, generate_impressions  # noqa: E402
from torchrec_hstu.models.ranking import HSTURanking, HSTURankingTrain  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ranking_two_channel.pbtxt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data (built-in synthetic impression log)")
    g.add_argument("--num-users", type=int, default=ImpressionConfig.num_users)
    g.add_argument("--num-items", type=int, default=ImpressionConfig.num_items)
    g.add_argument("--num-topics", type=int, default=ImpressionConfig.num_topics)
    g.add_argument("--history-len", type=int, default=ImpressionConfig.history_len)
    g.add_argument("--num-candidates", type=int, default=ImpressionConfig.num_candidates)
    g.add_argument("--eval-fraction", type=float, default=0.2, help="users held out for evaluation")
    g = p.add_argument_group("model")
    g.add_argument("--config", default=DEFAULT_CONFIG,
                   help="HSTUModel .pbtxt (channels, tasks, dims); 'none' builds from the flags below")
    g.add_argument("--channels", default="clicks,views",
                   help=f"without a config: history channels, from {sorted(CHANNEL_ACTION_FILTERS)}")
    g.add_argument("--item-embedding-dim", type=int, default=32)
    g.add_argument("--embedding-dim", type=int, default=64)
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--num-heads", type=int, default=2)
    g.add_argument("--attention-dim", type=int, default=32)
    g.add_argument("--hidden-dim", type=int, default=32)
    g.add_argument("--max-seq-len", type=int, default=256)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--kernel", default=None, help="override the config's kernel (auto, pytorch, triton, cutlass)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--eval-batch-size", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu or cuda (the item table stays on CPU)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default); see train_retrieval.py")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default="runs/ranking")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (default: <output-dir>/checkpoint.pt)")
    g.add_argument("--no-progress", action="store_true")
    add_debug_flag(p)
    return p


def build_model(args: argparse.Namespace, num_items: int) -> Tuple[HSTURanking, Dict[str, int], int]:
    """The model, its tasks (name -> label bitmask) and its max sequence length."""
    if args.config and args.config.lower() != "none":
        from torchrec_hstu.config import build_multi_channel, load_config

        cfg = load_config(args.config)
        kernel = args.kernel.upper() if args.kernel else None
        encoder = build_multi_channel(cfg, kernel=kernel)
        tasks = {t.task_name: int(t.task_bitmask) for t in cfg.tasks} or dict(DEFAULT_TASKS)
        model = HSTURanking(
            num_items, item_embedding_dim=cfg.item_embedding_dim or args.item_embedding_dim,
            encoder=encoder, task_names=list(tasks),
            item_mlp_hidden_dim=cfg.item_mlp_hidden_dim, fusion_hidden_dim=cfg.fusion_hidden_dim,
        )
        return model, tasks, cfg.max_seq_len or args.max_seq_len
    channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    model = HSTURanking(
        num_items,
        item_embedding_dim=args.item_embedding_dim,
        channels=channels,
        task_names=list(DEFAULT_TASKS),
        embedding_dim=args.embedding_dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        attention_dim=args.attention_dim,
        hidden_dim=args.hidden_dim,
        max_seq_len=args.max_seq_len,
        input_dropout_ratio=args.dropout,
        output_dropout_ratio=args.dropout,
        kernel=args.kernel or "auto",
    )
    return model, dict(DEFAULT_TASKS), args.max_seq_len


def item_ctr_scores(log: Impressions, train_users: torch.Tensor, bitmasks: Sequence[int]) -> torch.Tensor:
    """``[N, num_tasks]`` smoothed per-item positive rate over the training users' impressions."""
    ids = log.item_ids[train_users].reshape(-1)
    actions = log.actions[train_users].reshape(-1)
    shows = torch.bincount(ids, minlength=log.num_items).double()
    cols = []
    for mask in bitmasks:
        positives = torch.bincount(ids, weights=((actions & mask) > 0).double(), minlength=log.num_items)
        prior = positives.sum() / shows.sum()
        cols.append((positives + 10.0 * prior) / (shows + 10.0))
    return torch.stack(cols, dim=1).float()


def auc_per_task(scores: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> Dict[str, float]:
    out = {}
    for i, name in enumerate(names):
        # The AUC of exactly these tensors: no all-gather when a process group exists (DMP).
        metric = BinaryAUROC(sync_on_compute=False)
        metric.update(scores[:, i].float(), labels[:, i].long())
        out[f"AUC/{name}"] = metric.compute().item()
    return out


@torch.no_grad()
def evaluate(
    model: HSTURanking, log: Impressions, users: torch.Tensor, tasks: Dict[str, int],
    args: argparse.Namespace, max_history_len: int,
) -> Tuple[Dict[str, float], float]:
    """AUC per task (torchmetrics) and the mean BCE on ``users``' candidates."""
    was_training = model.training
    model.eval()
    bitmasks = list(tasks.values())
    metrics = [BinaryAUROC() for _ in tasks]
    total_loss, count = 0.0, 0
    batches = iterate_ranking_batches(log, users, args.eval_batch_size, model.channels, max_history_len=max_history_len)
    n = (users.numel() + args.eval_batch_size - 1) // args.eval_batch_size
    for batch in tqdm(batches, total=n, desc="eval", leave=False, disable=args.no_progress):
        logits = model(**batch.model_inputs()).float().cpu()
        labels = batch.labels(bitmasks)
        total_loss += torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum").item()
        count += labels.numel()
        for i, metric in enumerate(metrics):
            metric.update(torch.sigmoid(logits[:, i]), labels[:, i].long())
    model.train(was_training)
    return {f"AUC/{name}": m.compute().item() for name, m in zip(tasks, metrics)}, total_loss / max(count, 1)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    os.makedirs(args.output_dir, exist_ok=True)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    config = ImpressionConfig(
        num_users=args.num_users, num_items=args.num_items, num_topics=args.num_topics,
        history_len=args.history_len, num_candidates=args.num_candidates, seed=args.seed,
    )
    log = generate_impressions(config)
    train_users, eval_users = split_users(log.num_users, args.eval_fraction, args.seed)
    model, tasks, max_seq_len = build_model(args, log.num_items)
    unknown = [c for c in model.channels if c not in CHANNEL_ACTION_FILTERS]
    if unknown:
        raise UserError(f"channels {unknown} have no data in the impression log; use {sorted(CHANNEL_ACTION_FILTERS)}")
    # Histories are truncated so history + candidates fit the model's max_seq_len.
    max_history_len = max(1, max_seq_len - log.num_candidates)
    if device.type == "cuda":
        model.place(device)
    bitmasks = list(tasks.values())
    train_module = HSTURankingTrain(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    print(f"data: {log.num_users} users ({train_users.numel()} train / {eval_users.numel()} eval), "
          f"{log.num_items} items, {log.history_len} history + {log.num_candidates} candidate impressions each")
    print(f"model: channels {model.channels}, tasks {tasks}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, dense part on {model.dense_device()}")

    eval_ids = log.item_ids[eval_users][:, log.history_len:].reshape(-1)
    eval_actions = log.actions[eval_users][:, log.history_len:].reshape(-1)
    eval_labels = ((eval_actions.unsqueeze(1) & torch.tensor(bitmasks)) > 0).float()
    baselines = {
        "item-CTR": auc_per_task(item_ctr_scores(log, train_users, bitmasks)[eval_ids], eval_labels, list(tasks)),
    }
    if bitmasks == [DEFAULT_TASKS["click"], DEFAULT_TASKS["long_view"]]:
        oracle = log.probabilities[eval_users][:, log.history_len:].reshape(-1, 2)
        baselines["oracle"] = auc_per_task(oracle, eval_labels, list(tasks))

    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pt")
    start_epoch, history = resume_run(args.resume, checkpoint_path, model, optimizer)

    meter = Throughput()
    steps = num_batches(train_users.numel(), args.batch_size)
    for epoch in range(start_epoch, args.epochs):
        generator = epoch_generator(args.seed, epoch)
        model.train()
        total_loss, count = 0.0, 0
        bar = tqdm(
            iterate_ranking_batches(log, train_users, args.batch_size, model.channels, shuffle=True,
                                    generator=generator, max_history_len=max_history_len),
            total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=args.no_progress,
        )
        epoch_start = time.perf_counter()
        for batch in bar:
            meter.start()
            loss, _ = train_module(batch.labels(bitmasks), **batch.model_inputs())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            tokens = int(batch.history_lengths.sum()) + len(model.channels) * batch.candidate_ids.numel()
            meter.stop(batch.num_targets.numel(), tokens)
            total_loss += value
            count += 1
            bar.set_postfix(loss=f"{value:.4f}")
        metrics, eval_loss = evaluate(model, log, eval_users, tasks, args, max_history_len)
        record = {
            "epoch": epoch + 1,
            "loss": total_loss / max(count, 1),
            "eval_loss": eval_loss,
            "train_seconds": round(time.perf_counter() - epoch_start, 2),
            "metrics": metrics,
        }
        history.append(record)
        tqdm.write(f"epoch {epoch + 1}: loss {record['loss']:.4f} eval loss {eval_loss:.4f}  "
                   + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        save_checkpoint(checkpoint_path, model, optimizer, epoch + 1, history, vars(args))

    final = history[-1]["metrics"] if history else evaluate(model, log, eval_users, tasks, args, max_history_len)[0]
    print()
    keys = list(final)
    print(f"{'model':<12}" + "".join(f"{k:>18}" for k in keys))
    for name, row in {"HSTU": final, **baselines}.items():
        print(f"{name:<12}" + "".join(f"{row[k]:>18.4f}" for k in keys))
    throughput = meter.summary()
    if throughput["sequences"]:
        print(f"training throughput: {throughput['sequences_per_s']:.1f} sequences/s, "
              f"{throughput['tokens_per_s']:.1f} tokens/s ({throughput['seconds']:.1f} s in training steps)")
    payload = {
        "run": run_info(device),
        "args": vars(args),
        "data": {"name": "synthetic-impressions", **dataclasses.asdict(config),
                 "train_users": train_users.numel(), "eval_users": eval_users.numel()},
        "model": {"channels": model.channels, "tasks": tasks, "parameters": sum(p.numel() for p in model.parameters())},
        "baselines": baselines,
        "final": final,
        "history": history,
        "throughput": throughput,
    }
    write_json(os.path.join(args.output_dir, "metrics.json"), payload)
    if history:
        plot_history(os.path.join(args.output_dir, "training_curves.png"), history, keys,
                     baselines=baselines, title="HSTU ranking (synthetic impressions)")
    print(f"wrote {args.output_dir}/metrics.json, training_curves.png, checkpoint.pt")
    return payload


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    run_cli(main)
