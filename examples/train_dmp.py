"""Train HSTU retrieval or ranking across processes with torchrec DistributedModelParallel.

The item table is sharded by torchrec's ``EmbeddingShardingPlanner`` (table-wise or row-wise,
chosen by the planner or forced with ``--sharding``) and trained by a fused FBGEMM optimizer;
the HSTU transducer and heads are replicated with gradients all-reduced. Every rank reads its
share of each global batch; the loss, HR/NDCG/MRR (retrieval) and AUC (ranking) are reduced
across ranks, so the numbers are those of the whole global batch / evaluation set. Checkpoints
are sharded (``torch.distributed.checkpoint``) and load at any world size.

Launch with torchrun (``gloo`` on CPU, ``nccl`` with ``--device cuda``)::

    torchrun --standalone --nproc_per_node=2 examples/train_dmp.py retrieval
    torchrun --standalone --nproc_per_node=2 examples/train_dmp.py retrieval --sharding table_wise
    torchrun --standalone --nproc_per_node=2 examples/train_dmp.py ranking --config none --channels uih
    torchrun --standalone --nproc_per_node=8 examples/train_dmp.py retrieval --device cuda \\
        --embedding-optimizer adam --global-batch-size 1024
    torchrun --standalone --nproc_per_node=1 examples/train_dmp.py retrieval --resume auto

The data and model flags are those of ``examples/train_retrieval.py`` / ``train_ranking.py``
(``<task> --help`` lists them). Outputs in ``--output-dir``: ``metrics.json`` (per-step global
loss, per-epoch metrics, sharding plan) and ``checkpoints/step_XXXXXXXX/`` (DCP).
"""

import argparse
import dataclasses
import datetime
import importlib
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import resolve_device, run_info, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

from torchrec_hstu.cli import UserError, add_debug_flag, run_cli  # noqa: E402
from torchrec_hstu.data.ranking import CHANNEL_ACTION_FILTERS, make_ranking_batch, split_users  # noqa: E402
from torchrec_hstu.data.sequences import leave_last_out, make_batch  # noqa: E402
from torchrec_hstu.data.synthetic import ImpressionConfig, generate_impressions  # noqa: E402
from torchrec_hstu.distributed import (  # noqa: E402
    EMBEDDING_OPTIMIZERS,
    SHARDING_CHOICES,
    EmbeddingOptimizerConfig,
    all_gather_1d,
    all_reduce_sum,
    build_optimizer,
    checkpoint_path,
    describe_plan,
    eval_shards,
    global_mean_scale,
    latest_checkpoint,
    load_checkpoint,
    num_global_batches,
    plan_sharding,
    record_errors,
    save_checkpoint,
    shard_model,
    step_generator,
    train_shards,
)
from torchrec_hstu.models.metrics import metrics_from_ranks, target_ranks  # noqa: E402
from torchrec_hstu.models.ranking import HSTURankingTrain  # noqa: E402
from torchrec_hstu.models.retrieval import NEGATIVE_STRATEGIES, HSTURetrievalTrain, sample_negatives  # noqa: E402

#: task -> the single-process example whose data and model flags and builders it reuses
#: (imported on demand: ``train_ranking`` pulls in torchmetrics).
TASKS = {"retrieval": "train_retrieval", "ranking": "train_ranking"}


def _example(task: str):
    return importlib.import_module(TASKS[task])
#: Seconds a collective waits for the other ranks (``--dist-timeout``): a stopped or hung rank
#: ends the job after about this plus torchrun's ~30 s teardown. The longest a rank works alone
#: while the others wait is rank 0's baselines before the first step; see docs/distributed.md.
DEFAULT_DIST_TIMEOUT = 120.0
DEFAULTS = {
    "retrieval": dict(epochs=20, lr=3e-3, global_batch_size=128, eval_batch_size=256),
    "ranking": dict(epochs=8, lr=2e-3, global_batch_size=128, eval_batch_size=256),
}


# -- command line ----------------------------------------------------------------------------


#: Model flags that do not change the model's tensors (free to differ when resuming).
_NOT_IN_MODEL_CONFIG = ("kernel", "dropout")


def _copy_groups(
    source: argparse.ArgumentParser, target: argparse.ArgumentParser, prefixes: Sequence[str]
) -> Dict[str, List[str]]:
    """Add the argument groups of ``source`` whose titles start with ``prefixes`` to ``target``
    (same flags, defaults and help as the single-process example).

    Returns:
        ``{prefix: dests of its flags}``.
    """
    dests: Dict[str, List[str]] = {}
    for prefix in prefixes:
        groups = [g for g in source._action_groups if (g.title or "").startswith(prefix)]
        if not groups:
            raise RuntimeError(f"{source.prog}: no argument group titled {prefix!r}*")
        for group in groups:
            new = target.add_argument_group(group.title)
            for action in group._group_actions:
                new._add_action(action)
                dests.setdefault(prefix, []).append(action.dest)
    return dests


def build_parser(tasks: Sequence[str] = tuple(TASKS)) -> argparse.ArgumentParser:
    """The command line; only the subcommands in ``tasks`` get their flags (and imports)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    subparsers = parser.add_subparsers(dest="task", required=True, metavar="{retrieval,ranking}")
    for task in TASKS:
        sub = subparsers.add_parser(task, help=f"{task} model (flags of examples/train_{task}.py)",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if task not in tasks:
            continue
        copied = _copy_groups(_example(task).build_parser(), sub, ("data", "model"))
        sub.set_defaults(model_dests=[d for d in copied["model"] if d not in _NOT_IN_MODEL_CONFIG])
        d = DEFAULTS[task]
        g = sub.add_argument_group("distributed training")
        g.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl; rank i uses cuda:LOCAL_RANK)")
        g.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"), help="auto: gloo on cpu, nccl on cuda")
        g.add_argument("--sharding", default="auto", choices=SHARDING_CHOICES,
                       help="item table sharding: auto lets the planner pick table_wise or row_wise")
        g.add_argument("--embedding-optimizer", default="rowwise_adagrad", choices=EMBEDDING_OPTIMIZERS,
                       help="fused optimizer of the sharded item table (adam: GPU only)")
        g.add_argument("--embedding-lr", type=float, default=0.05)
        g.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate of the dense part")
        g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the dense part")
        g.add_argument("--epochs", type=int, default=d["epochs"])
        g.add_argument("--global-batch-size", type=int, default=d["global_batch_size"],
                       help="sequences per step over all ranks (each rank gets its share)")
        g.add_argument("--max-steps", type=int, default=0, help="stop after this many global steps (0: all epochs)")
        g.add_argument("--eval-batch-size", type=int, default=d["eval_batch_size"], help="per rank")
        g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs and at the end (0: never)")
        g.add_argument("--seed", type=int, default=0, help="model init, data order, negatives, data generation")
        if task == "retrieval":
            g.add_argument("--num-negatives", type=int, default=256, help="shared sampled negatives per step")
            g.add_argument("--negatives", default="uniform", choices=NEGATIVE_STRATEGIES,
                           help="in_batch / mixed draw from the whole global batch (all-gathered ids)")
            g.add_argument("--temperature", type=float, default=0.05)
        g.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: leave as is)")
        g.add_argument("--dist-timeout", type=float, default=DEFAULT_DIST_TIMEOUT,
                       help="seconds a collective may wait for other ranks before failing: a hung rank "
                       "ends the job after about this plus 30 s (raise it if one rank works alone longer)")
        g = sub.add_argument_group("outputs and checkpoints")
        g.add_argument("--output-dir", default=f"runs/dmp-{task}")
        g.add_argument("--checkpoint-dir", default=None, help="default: <output-dir>/checkpoints")
        g.add_argument("--checkpoint-every", type=int, default=0,
                       help="also save every N global steps (always at each epoch end)")
        g.add_argument("--no-checkpoint", action="store_true", help="save nothing")
        g.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue from a checkpoint folder (auto: the latest in --checkpoint-dir); any world size")
        g.add_argument("--no-progress", action="store_true")
        g.add_argument("--fail-at-step", default=None, metavar="RANK:STEP",
                       help="fault injection (tests): raise on RANK when global step STEP starts")
        add_debug_flag(sub)
    return parser


# -- process group -----------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args: argparse.Namespace) -> Dist:
    """Initialize the default process group from torchrun's environment (or a 1-rank world)."""
    if "RANK" not in os.environ:  # plain `python train_dmp.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = args.backend if args.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise UserError("--backend nccl needs --device cuda")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


# -- tasks -------------------------------------------------------------------------------------


class RetrievalTask:
    """Leave-last-out next-item retrieval (data and model of ``train_retrieval.py``)."""

    def __init__(self, args: argparse.Namespace, env: Dist) -> None:
        self.args, self.env = args, env
        self.example = train_retrieval = _example("retrieval")
        dataset, self.data_info = train_retrieval.load_data(args, args.seed)
        self.split = leave_last_out(dataset)
        self.num_items = dataset.num_items
        self.num_rows = self.split.train.num_users
        self.model = train_retrieval.build_model(args, self.num_items)
        self.train_module = HSTURetrievalTrain(self.model, temperature=args.temperature)

    def describe(self) -> str:
        return (f"{self.data_info['name']}: {self.num_rows} users, {self.num_items} items, "
                f"{self.split.train.num_interactions} training interactions")

    def step(self, dmp: torch.nn.Module, rows: torch.Tensor, epoch: int, step: int) -> Tuple[torch.Tensor, int, int]:
        """This rank's scaled loss (``global_mean_scale``), its sequences and tokens."""
        args, device = self.args, self.env.device
        batch = make_batch(self.split.train, rows, args.max_seq_len)
        local_count = int(torch.clamp(batch.lengths - 1, min=0).sum())
        scale, _ = global_mean_scale(local_count, device)
        # Every rank draws the same negatives: same generator; in-batch ones from the global batch.
        pool = all_gather_1d(batch.item_ids.to(device)).cpu() if args.negatives != "uniform" else batch.item_ids[:0]
        negatives, log_q = sample_negatives(
            args.negatives, args.num_negatives, self.num_items, pool, step_generator(args.seed, epoch, step)
        )
        loss = dmp(
            batch.item_ids.to(device), batch.lengths.to(device), batch.timestamps.to(device), batch.max_seq_len,
            negatives.to(device), None if log_q is None else log_q.to(device),
        )
        return loss * scale, batch.batch_size, batch.num_tokens

    @torch.no_grad()
    def evaluate(self, dmp: Any) -> Dict[str, float]:
        """HR/NDCG@10/50 and MRR over every user (each rank scores its share)."""
        args, env = self.args, self.env
        model = dmp.module.model
        model.eval()
        items = model.all_item_embeddings()
        ranks: List[torch.Tensor] = []
        for rows, valid in eval_shards(self.num_rows, args.eval_batch_size, env.rank, env.world_size):
            batch = make_batch(self.split.train, rows, args.max_seq_len)
            users = model.user_embeddings(batch.item_ids.to(env.device), batch.lengths.to(env.device),
                                          batch.timestamps.to(env.device), batch.max_seq_len)
            if valid:
                targets = self.split.test_targets[batch.users].to(users.device)
                ranks.append(target_ranks(users @ items.t(), targets))
        model.train()
        local = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64, device=env.device)
        return metrics_from_ranks(all_gather_1d(local).cpu())

    def baselines(self) -> Dict[str, Dict[str, float]]:
        return self.example.evaluate_baselines(self.split, self.args)


class RankingTask:
    """Multi-task ranking of candidates (data and model of ``train_ranking.py``)."""

    def __init__(self, args: argparse.Namespace, env: Dist) -> None:
        self.args, self.env = args, env
        self.example = train_ranking = _example("ranking")
        config = ImpressionConfig(
            num_users=args.num_users, num_items=args.num_items, num_topics=args.num_topics,
            history_len=args.history_len, num_candidates=args.num_candidates, seed=args.seed,
        )
        self.log = generate_impressions(config)
        self.data_info = {"name": "synthetic-impressions", **dataclasses.asdict(config)}
        self.train_users, self.eval_users = split_users(self.log.num_users, args.eval_fraction, args.seed)
        self.num_items = self.log.num_items
        self.num_rows = self.train_users.numel()
        self.model, self.tasks, max_seq_len = train_ranking.build_model(args, self.num_items)
        unknown = [c for c in self.model.channels if c not in CHANNEL_ACTION_FILTERS]
        if unknown:
            raise UserError(f"channels {unknown} have no data in the impression log; use {sorted(CHANNEL_ACTION_FILTERS)}")
        self.max_history_len = max(1, max_seq_len - self.log.num_candidates)
        self.bitmasks = list(self.tasks.values())
        self.metric_keys = tuple(f"AUC/{t}" for t in self.tasks)
        self.train_module = HSTURankingTrain(self.model)

    def describe(self) -> str:
        return (f"synthetic impressions: {self.train_users.numel()} train / {self.eval_users.numel()} eval users, "
                f"{self.num_items} items, channels {self.model.channels}, tasks {list(self.tasks)}")

    def _batch(self, users: torch.Tensor):
        return make_ranking_batch(self.log, users, self.model.channels, self.max_history_len)

    def step(self, dmp: torch.nn.Module, rows: torch.Tensor, epoch: int, step: int) -> Tuple[torch.Tensor, int, int]:
        device = self.env.device
        batch = self._batch(self.train_users[rows])
        scale, _ = global_mean_scale(batch.candidate_ids.numel(), device)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.model_inputs().items()}
        loss, _ = dmp(batch.labels(self.bitmasks).to(device), **inputs)
        tokens = int(batch.history_lengths.sum()) + len(self.model.channels) * batch.candidate_ids.numel()
        return loss * scale, batch.num_targets.numel(), tokens

    @torch.no_grad()
    def evaluate(self, dmp: Any) -> Dict[str, float]:
        """AUC per task over every evaluation user's candidates (gathered from all ranks)."""
        args, env = self.args, self.env
        model = dmp.module.model
        model.eval()
        scores, labels = [], []
        for rows, valid in eval_shards(self.eval_users.numel(), args.eval_batch_size, env.rank, env.world_size):
            batch = self._batch(self.eval_users[rows])
            inputs = {k: v.to(env.device) if isinstance(v, torch.Tensor) else v for k, v in batch.model_inputs().items()}
            logits = model(**inputs)
            if valid:
                scores.append(torch.sigmoid(logits.float()))
                labels.append(batch.labels(self.bitmasks).to(logits.device))
        model.train()
        tasks = len(self.tasks)
        empty = torch.zeros(0, tasks, device=env.device)
        s = all_gather_1d((torch.cat(scores) if scores else empty).reshape(-1)).cpu().reshape(-1, tasks)
        y = all_gather_1d((torch.cat(labels) if labels else empty).reshape(-1)).cpu().reshape(-1, tasks)
        return self.example.auc_per_task(s, y, list(self.tasks))

    def baselines(self) -> Dict[str, Dict[str, float]]:
        log, tasks = self.log, list(self.tasks)
        ids = log.item_ids[self.eval_users][:, log.history_len:].reshape(-1)
        actions = log.actions[self.eval_users][:, log.history_len:].reshape(-1)
        labels = ((actions.unsqueeze(1) & torch.tensor(self.bitmasks)) > 0).float()
        ctr = self.example.item_ctr_scores(log, self.train_users, self.bitmasks)[ids]
        return {"item-CTR": self.example.auc_per_task(ctr, labels, tasks)}


# -- training loop -----------------------------------------------------------------------------


def _dropout_seed(seed: int, global_step: int, rank: int) -> int:
    # Dropout masks: a function of (seed, step, rank), so nothing RNG-related needs saving.
    return (seed * 1_000_003 + global_step) * 4099 + rank


def _parse_failure(spec: Optional[str]) -> Optional[Tuple[int, int]]:
    if spec is None:
        return None
    try:
        rank, step = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"--fail-at-step must be RANK:STEP (integers); got {spec!r}") from None
    return rank, step


def run(args: argparse.Namespace) -> Dict[str, Any]:
    env = init_distributed(args)
    is_main = env.rank == 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.global_batch_size % env.world_size != 0:
        raise UserError(f"--global-batch-size {args.global_batch_size} must be divisible by the "
                         f"world size {env.world_size}")
    failure = _parse_failure(args.fail_at_step)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    task = RetrievalTask(args, env) if args.task == "retrieval" else RankingTask(args, env)
    if is_main:
        print(f"world: {env.world_size} ranks, backend {env.backend}, device {env.device.type}")
        print(f"data: {task.describe()}")

    emb_opt = EmbeddingOptimizerConfig(name=args.embedding_optimizer, lr=args.embedding_lr)
    plan, sharders = plan_sharding(
        task.train_module, env.world_size, env.device.type, args.sharding, emb_opt,
        batch_size_per_rank=args.global_batch_size // env.world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)),
    )
    dmp = shard_model(task.train_module, plan, sharders, env.device)
    lookup_device = dmp.module.model.embedding_device()
    if lookup_device != env.device:
        raise RuntimeError(f"rank {env.rank}: lookups would take inputs on {lookup_device}, the rank's device is {env.device}")
    optimizer = build_optimizer(
        dmp, lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    )
    plan_info = describe_plan(plan)
    if is_main:
        for table, spec in plan_info.items():
            print(f"sharding: {table}: {spec['sharding_type']} ({spec['compute_kernel']}) on ranks {spec['ranks']}")

    model_config = {"task": args.task, "num_items": task.num_items,
                    **{k: getattr(args, k) for k in args.model_dests}}
    training_config = {
        k: v for k, v in vars(args).items()
        if k not in ("model_dests", "resume", "fail_at_step") and isinstance(v, (int, float, str, bool, type(None)))
    }
    checkpoint_dir = args.checkpoint_dir or os.path.join(args.output_dir, "checkpoints")
    steps_per_epoch = num_global_batches(task.num_rows, args.global_batch_size)
    if steps_per_epoch == 0:
        raise UserError(f"{task.num_rows} training rows give no full global batch of {args.global_batch_size}")

    epoch, start_step, global_step = 0, 0, 0
    if args.resume:
        path = latest_checkpoint(checkpoint_dir) if args.resume == "auto" else args.resume
        if path is None:
            raise UserError(f"--resume auto: no checkpoint in {checkpoint_dir}")
        info = load_checkpoint(path, dmp.module.model, optimizer, model_config=model_config)
        epoch, start_step, global_step = (info.progress[k] for k in ("epoch", "next_step", "global_step"))
        saved_batch = info.training_config.get("global_batch_size")
        if saved_batch != args.global_batch_size and is_main:
            print(f"warning: checkpoint was trained with --global-batch-size {saved_batch}; now {args.global_batch_size}")
        if is_main:
            print(f"resumed from {path} (saved by {info.world_size} ranks) at epoch {epoch}, step {start_step}")

    def save(epoch_: int, next_step: int) -> None:
        if args.no_checkpoint:
            return
        path = checkpoint_path(checkpoint_dir, global_step)
        save_checkpoint(
            path, dmp.module.model, optimizer,
            progress={"epoch": epoch_, "next_step": next_step, "global_step": global_step},
            model_config=model_config, training_config=training_config, sharding=plan_info,
        )
        if is_main:
            tqdm.write(f"saved {path}")

    os.makedirs(args.output_dir, exist_ok=True)
    baselines = task.baselines() if is_main and args.eval_every > 0 else {}
    step_records: List[Dict[str, Any]] = []
    history: List[Dict[str, Any]] = []
    seqs, tokens, train_seconds = 0, 0, 0.0
    stop = False
    while epoch < args.epochs and not stop:
        shares: List[torch.Tensor] = []
        steps_done: List[int] = []
        bar = tqdm(train_shards(task.num_rows, args.global_batch_size, args.seed, epoch, env.rank,
                                env.world_size, start_step=start_step),
                   total=steps_per_epoch - start_step, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                   disable=args.no_progress or not is_main)
        for step, rows in bar:
            if failure is not None and failure == (env.rank, global_step):
                raise RuntimeError(f"injected failure on rank {env.rank} at global step {global_step}")
            begin = time.perf_counter()
            torch.manual_seed(_dropout_seed(args.seed, global_step, env.rank))
            loss, n_seq, n_tok = task.step(dmp, rows, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # The scaled losses average (over ranks) to the global-batch mean.
            shares.append(loss.detach().float().reshape(1) / env.world_size)
            steps_done.append(global_step)
            train_seconds += time.perf_counter() - begin
            seqs, tokens = seqs + n_seq, tokens + n_tok
            global_step += 1
            last_in_epoch = step + 1 == steps_per_epoch
            if args.checkpoint_every > 0 and global_step % args.checkpoint_every == 0 and not last_in_epoch:
                save(epoch, step + 1)
            if args.max_steps and global_step >= args.max_steps:
                stop = True
                break
        global_losses = all_reduce_sum(torch.cat(shares)).cpu() if shares else torch.zeros(0)
        losses = global_losses.tolist()
        step_records.extend({"global_step": s + 1, "epoch": epoch + 1, "loss": v} for s, v in zip(steps_done, losses))
        finished_epoch = start_step + len(steps_done) == steps_per_epoch
        record_: Dict[str, Any] = {"epoch": epoch + 1, "steps": len(losses),
                                   "loss": sum(losses) / max(len(losses), 1)}
        next_epoch, next_step = (epoch + 1, 0) if finished_epoch else (epoch, start_step + len(steps_done))
        if finished_epoch and args.eval_every > 0 and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            record_["metrics"] = task.evaluate(dmp)
        if is_main:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in record_.get("metrics", {}).items())
            tqdm.write(f"epoch {epoch + 1}: loss {record_['loss']:.4f} ({len(losses)} steps)  {shown}")
        history.append(record_)
        if steps_done:
            save(next_epoch, next_step)
        epoch, start_step = next_epoch, next_step

    totals = all_reduce_sum(torch.tensor([seqs, tokens], dtype=torch.float64, device=env.device)).tolist()
    throughput = {"seconds_rank0": round(train_seconds, 3), "sequences": int(totals[0]), "tokens": int(totals[1]),
                  "sequences_per_s": round(totals[0] / max(train_seconds, 1e-9), 1),
                  "tokens_per_s": round(totals[1] / max(train_seconds, 1e-9), 1)}
    payload = {
        "run": {**run_info(env.device), "world_size": env.world_size, "backend": env.backend},
        "task": args.task,
        "args": {k: v for k, v in vars(args).items() if k != "model_dests"},
        "data": task.data_info,
        "sharding": plan_info,
        "baselines": baselines,
        "steps": step_records,
        "history": history,
        "final": next((h["metrics"] for h in reversed(history) if "metrics" in h), None),
        "throughput": throughput,
    }
    if is_main:
        write_json(os.path.join(args.output_dir, "metrics.json"), payload)
        if payload["final"]:
            keys = list(payload["final"])
            print(f"\n{'model':<18}" + "".join(f"{k:>12}" for k in keys))
            for name, row in {"HSTU (DMP)": payload["final"], **baselines}.items():
                print(f"{name:<18}" + "".join(f"{row.get(k, float('nan')):>12.4f}" for k in keys))
        print(f"training throughput: {throughput['sequences_per_s']:.1f} sequences/s over {env.world_size} ranks")
        print(f"wrote {args.output_dir}/metrics.json")
    dist.barrier()
    dist.destroy_process_group()
    return payload


@record_errors
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    chosen = [a for a in argv if a in TASKS][:1]
    return run(build_parser(chosen or tuple(TASKS)).parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
