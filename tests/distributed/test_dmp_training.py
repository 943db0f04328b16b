"""DMP training on CPU (gloo, torchrun) against an independent single-process oracle.

One 2-rank retrieval run (row-wise sharded item table) is the subject of most tests: it must
reproduce, step by step, a plain single-process training loop written here (no DMP, no
process group, torch optimizers: AdamW for the dense part, ``torch.optim.Adagrad`` for the
item table, which is what FBGEMM's fused exact Adagrad computes) on the same global batches.
Optimizer states are compared too: they are sensitive to the gradient scale, which the
(scale-invariant) Adagrad / Adam updates are not.

Tolerances: float32 with different summation orders (per-rank vs whole-batch reductions,
all-to-all gradient sums), which Adam's ``g / sqrt(v)`` amplifies for near-zero gradients:
losses ``rtol=2e-5``, weights and optimizer moments ``rtol=1e-4, atol=2e-4``. Measured
(2026-11-25, CPU): retrieval after 6 steps: losses 3e-7 relative, weights 1e-6, AdamW
moments 2e-6, Adagrad sums 3e-7 relative; ranking after 3 steps: losses 1e-7 relative,
weights 3e-5 at most.
"""

import os
from typing import Dict, List

import pytest
import torch

import train_dmp  # examples/ is on sys.path (conftest)
import train_ranking
import train_retrieval
from torchrec_hstu.data.ranking import make_ranking_batch, split_users
from torchrec_hstu.data.sequences import leave_last_out, make_batch
from torchrec_hstu.data.synthetic import ImpressionConfig, generate_impressions
from torchrec_hstu.distributed import (
    checkpoint_path,
    consolidate_checkpoint,
    epoch_permutation,
    load_checkpoint,
    read_manifest,
    read_tensors,
    step_generator,
)
from torchrec_hstu.models.metrics import metrics_from_ranks, target_ranks
from torchrec_hstu.models.ranking import HSTURankingTrain
from torchrec_hstu.models.retrieval import HSTURetrievalTrain, sample_negatives

SEED = 3
GLOBAL_BATCH = 16
STEPS = 6  # 96 users / 16 per global batch: one epoch
LOSS_TOL = dict(rtol=2e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-4, atol=2e-4)

TINY_RETRIEVAL = [
    "retrieval", "--num-users", "96", "--num-items", "64", "--num-clusters", "4", "--ring-len", "16",
    "--min-len", "4", "--max-len", "10", "--embedding-dim", "8", "--num-layers", "1", "--num-heads", "2",
    "--attention-dim", "4", "--hidden-dim", "4", "--max-seq-len", "12", "--num-gap-buckets", "8",
    "--dropout", "0", "--kernel", "pytorch", "--num-negatives", "16", "--global-batch-size", str(GLOBAL_BATCH),
    "--epochs", "1", "--embedding-optimizer", "adagrad", "--embedding-lr", "0.1", "--lr", "0.01",
    "--eval-batch-size", "32", "--seed", str(SEED), "--no-progress",
]


def _args(argv: List[str]):
    return train_dmp.build_parser().parse_args(argv)


# -- the single-process oracle -------------------------------------------------------------


class RetrievalReference:
    """Plain single-process training on whole global batches."""

    def __init__(self, argv: List[str]) -> None:
        args = _args(argv)
        self.args = args
        torch.manual_seed(args.seed)  # the example seeds once, then builds data and model
        dataset, _ = train_retrieval.load_data(args, args.seed)
        self.split = leave_last_out(dataset)
        self.num_items = dataset.num_items
        self.model = train_retrieval.build_model(args, self.num_items)
        self.loss_fn = HSTURetrievalTrain(self.model, temperature=args.temperature)
        self.table = self.model.embedding_collection.embeddings[self.model.table_name].weight
        self.dense = {n: p for n, p in self.model.named_parameters() if p is not self.table}
        self.adamw = torch.optim.AdamW(list(self.dense.values()), lr=args.lr, weight_decay=args.weight_decay)
        self.adagrad = torch.optim.Adagrad([self.table], lr=args.embedding_lr, eps=1e-8)
        self.losses: List[float] = []
        self.snapshots: Dict[int, Dict[str, torch.Tensor]] = {}

    def train(self, steps: int) -> None:
        args = self.args
        order = epoch_permutation(self.split.train.num_users, args.seed, 0)
        for step in range(steps):
            rows = order[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
            batch = make_batch(self.split.train, rows, args.max_seq_len)
            negatives, log_q = sample_negatives(
                args.negatives, args.num_negatives, self.num_items, batch.item_ids[:0],
                step_generator(args.seed, 0, step),
            )
            loss = self.loss_fn(batch.item_ids, batch.lengths, batch.timestamps, batch.max_seq_len, negatives, log_q)
            self.adamw.zero_grad(set_to_none=True)
            self.adagrad.zero_grad(set_to_none=True)
            loss.backward()
            self.adamw.step()
            self.adagrad.step()
            self.losses.append(loss.item())
            self.snapshots[step + 1] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        self.model.eval()
        users = torch.arange(self.split.train.num_users)
        batch = make_batch(self.split.train, users, self.args.max_seq_len)
        scores = self.model(batch.item_ids, batch.lengths, batch.timestamps, batch.max_seq_len)
        self.model.train()
        return metrics_from_ranks(target_ranks(scores, self.split.test_targets))


def _assert_optimizer_state_matches(ckpt: str, model, adamw, adagrad) -> None:
    """Saved optimizer state (DMP names) == the oracle's torch optimizer state."""
    state = read_tensors(ckpt, prefix="optimizer.")
    table = model.embedding_collection.embeddings[model.table_name].weight
    table_key = f"optimizer.model.embedding_collection.embeddings.{model.table_name}.weight"
    momentum = state[f"{table_key}.{model.table_name}.momentum1"]
    torch.testing.assert_close(momentum, adagrad.state[table]["sum"], **WEIGHT_TOL)
    for name, param in model.named_parameters():
        if param is table:
            continue
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                state[f"optimizer.model.{name}.{moment}"], adamw.state[param][moment], **WEIGHT_TOL,
                msg=lambda m, n=name, mo=moment: f"{n}.{mo}: {m}",
            )


def _assert_weights_match(ckpt: str, expected: Dict[str, torch.Tensor]) -> None:
    weights = read_tensors(ckpt, prefix="model.")
    assert sorted(weights) == sorted(f"model.{k}" for k in expected)
    for key, value in expected.items():
        torch.testing.assert_close(weights[f"model.{key}"], value, **WEIGHT_TOL, msg=lambda m, k=key: f"{k}: {m}")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> RetrievalReference:
    ref = RetrievalReference(TINY_RETRIEVAL)
    ref.train(STEPS)
    return ref


@pytest.fixture(scope="module")
def two_rank_run(launch, tmp_path_factory):
    """2 ranks, row-wise sharded table, checkpoints after steps 3 and 6, evaluation at the end."""
    out = str(tmp_path_factory.mktemp("dmp2"))
    result = launch(2, TINY_RETRIEVAL + ["--sharding", "row_wise", "--checkpoint-every", "3", "--output-dir", out])
    assert result.returncode == 0, result.output[-6000:]
    return out, result.metrics(out)


# -- tests -------------------------------------------------------------------------------------


def test_two_ranks_train_like_one_process(two_rank_run, reference):
    out, metrics = two_rank_run
    assert metrics["run"]["world_size"] == 2
    plan = metrics["sharding"]["model.embedding_collection.item_table"]
    assert plan["sharding_type"] == "row_wise" and plan["ranks"] == [0, 1]
    losses = [s["loss"] for s in metrics["steps"]]
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference.losses), **LOSS_TOL)
    final = checkpoint_path(os.path.join(out, "checkpoints"), STEPS)
    _assert_weights_match(final, reference.snapshots[STEPS])
    _assert_optimizer_state_matches(final, reference.model, reference.adamw, reference.adagrad)


def test_metrics_reduced_across_ranks_equal_single_process_eval(two_rank_run, reference):
    _, metrics = two_rank_run
    expected = reference.evaluate()
    got = metrics["final"]
    # Ranks are integers: a float-level score difference can move a tied item by one place.
    tol = 2.0 / reference.split.train.num_users
    for key in train_retrieval.METRIC_KEYS:
        assert abs(got[key] - expected[key]) <= tol, (key, got[key], expected[key])


@pytest.mark.parametrize("nproc, sharding", [(1, "row_wise"), (2, "table_wise")])
def test_resume_at_another_world_size_and_sharding(launch, two_rank_run, reference, tmp_path, nproc, sharding):
    """The step-3 checkpoint of the 2-rank row-wise run continues at world size 1, and at world
    size 2 re-sharded table-wise, exactly like the uninterrupted training."""
    out, first = two_rank_run
    start = checkpoint_path(os.path.join(out, "checkpoints"), 3)
    assert read_manifest(start).progress == {"epoch": 0, "next_step": 3, "global_step": 3}
    resumed_dir = str(tmp_path / "resumed")
    result = launch(nproc, TINY_RETRIEVAL + ["--sharding", sharding, "--eval-every", "0", "--resume", start,
                                             "--output-dir", resumed_dir])
    assert result.returncode == 0, result.output[-6000:]
    metrics = result.metrics(resumed_dir)
    assert metrics["run"]["world_size"] == nproc
    assert metrics["sharding"]["model.embedding_collection.item_table"]["sharding_type"] == sharding
    assert [s["global_step"] for s in metrics["steps"]] == [4, 5, 6]
    losses = torch.tensor([s["loss"] for s in metrics["steps"]])
    torch.testing.assert_close(losses, torch.tensor(reference.losses[3:]), **LOSS_TOL)
    torch.testing.assert_close(losses, torch.tensor([s["loss"] for s in first["steps"][3:]]), **LOSS_TOL)
    final = checkpoint_path(os.path.join(resumed_dir, "checkpoints"), STEPS)
    _assert_weights_match(final, reference.snapshots[STEPS])
    _assert_optimizer_state_matches(final, reference.model, reference.adamw, reference.adagrad)


def test_exported_model_from_dmp_checkpoint_predicts_like_single_process(two_rank_run, reference, tmp_path):
    """The DMP run's sharded checkpoint, consolidated into one state_dict file, loaded through
    the model builder's checkpoint reader (``torchrec_hstu.models.build``) and exported with
    ``torchrec_hstu.export``: the exported program scores like the single-process model
    (batches unlike the export example).
    The AOTInductor compile of the same program is the export module's own test."""
    from torchrec_hstu.export import export_program
    from torchrec_hstu.models.build import load_checkpoint_state

    out, _ = two_rank_run
    args = reference.args
    state_file = consolidate_checkpoint(checkpoint_path(os.path.join(out, "checkpoints"), STEPS),
                                        str(tmp_path / "model.pt"))
    torch.manual_seed(1234)  # different init: every weight must come from the checkpoint
    plain = train_retrieval.build_model(args, reference.num_items)
    plain.load_state_dict(load_checkpoint_state(state_file))
    direct = train_retrieval.build_model(args, reference.num_items)  # sharded -> plain, no process group
    load_checkpoint(checkpoint_path(os.path.join(out, "checkpoints"), STEPS), direct)
    for key, value in direct.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=0, atol=0)
    program, signature = export_program(plain.eval(), max_batch_size=16, max_seq_len=args.max_seq_len)
    assert signature.num_items == reference.num_items
    exported = program.module()
    reference.model.eval()
    for users in (torch.arange(0, reference.split.train.num_users, 7), torch.tensor([5, 60])):
        batch = make_batch(reference.split.train, users, args.max_seq_len)
        with torch.no_grad():
            expected = reference.model(batch.item_ids, batch.lengths, batch.timestamps, batch.max_seq_len)
            got = exported(batch.item_ids, batch.lengths, batch.timestamps)
        torch.testing.assert_close(got, expected, **WEIGHT_TOL)
    reference.model.train()


def test_failing_rank_stops_the_launch(launch, tmp_path):
    """Rank 1 raises at global step 1 while rank 0 waits in a collective: torchrun tears the
    job down and exits non-zero, well before the limit (a hang would hit it)."""
    argv = TINY_RETRIEVAL + ["--eval-every", "0", "--no-checkpoint", "--fail-at-step", "1:1",
                             "--dist-timeout", "60", "--output-dir", str(tmp_path / "fail")]
    result = launch(2, argv, timeout=75.0)
    assert result.returncode != 0
    assert "injected failure on rank 1 at global step 1" in result.output
    assert not os.path.exists(tmp_path / "fail" / "metrics.json")


# -- ranking -------------------------------------------------------------------------------------

TINY_RANKING = [
    "ranking", "--num-users", "60", "--num-items", "40", "--num-topics", "4", "--history-len", "6",
    "--num-candidates", "2", "--eval-fraction", "0.2", "--config", "none", "--channels", "uih,clicks",
    "--item-embedding-dim", "8", "--embedding-dim", "8", "--num-layers", "1", "--num-heads", "1",
    "--attention-dim", "4", "--hidden-dim", "4", "--max-seq-len", "10", "--dropout", "0", "--kernel", "pytorch",
    "--global-batch-size", "16", "--epochs", "1", "--max-steps", "3", "--embedding-optimizer", "adagrad",
    "--embedding-lr", "0.1", "--lr", "0.01", "--seed", str(SEED), "--no-progress",
]


def test_ranking_two_ranks_train_like_one_process(launch, tmp_path):
    """Two history channels (one table, three KJT keys) under DMP: same losses, weights and
    AUC as one process on the same global batches."""
    out = str(tmp_path / "ranking")
    result = launch(2, TINY_RANKING + ["--output-dir", out])
    assert result.returncode == 0, result.output[-6000:]
    metrics = result.metrics(out)

    args = _args(TINY_RANKING)
    torch.manual_seed(args.seed)
    config = ImpressionConfig(num_users=args.num_users, num_items=args.num_items, num_topics=args.num_topics,
                              history_len=args.history_len, num_candidates=args.num_candidates, seed=args.seed)
    log = generate_impressions(config)
    train_users, eval_users = split_users(log.num_users, args.eval_fraction, args.seed)
    model, tasks, max_seq_len = train_ranking.build_model(args, log.num_items)
    loss_fn = HSTURankingTrain(model)
    table = model.embedding_collection.embeddings[model.table_name].weight
    adamw = torch.optim.AdamW([p for p in model.parameters() if p is not table], lr=args.lr,
                              weight_decay=args.weight_decay)
    adagrad = torch.optim.Adagrad([table], lr=args.embedding_lr, eps=1e-8)
    order = epoch_permutation(train_users.numel(), args.seed, 0)
    history = max(1, max_seq_len - log.num_candidates)
    losses = []
    for step in range(3):
        rows = order[step * 16 : (step + 1) * 16]
        batch = make_ranking_batch(log, train_users[rows], model.channels, history)
        loss, _ = loss_fn(batch.labels(list(tasks.values())), **batch.model_inputs())
        adamw.zero_grad(set_to_none=True)
        adagrad.zero_grad(set_to_none=True)
        loss.backward()
        adamw.step()
        adagrad.step()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor([s["loss"] for s in metrics["steps"]]), torch.tensor(losses), **LOSS_TOL)
    final = checkpoint_path(os.path.join(out, "checkpoints"), 3)
    _assert_weights_match(final, {k: v.detach() for k, v in model.state_dict().items()})
    _assert_optimizer_state_matches(final, model, adamw, adagrad)

    model.eval()
    with torch.no_grad():
        batch = make_ranking_batch(log, eval_users, model.channels, history)
        scores = torch.sigmoid(model(**batch.model_inputs()))
    expected = train_ranking.auc_per_task(scores, batch.labels(list(tasks.values())), list(tasks))
    for key, value in expected.items():
        assert abs(metrics["final"][key] - value) < 1e-4, (key, metrics["final"][key], value)
