"""Shared pieces of the export tests: test configs, request batches, the eager oracle."""

import os
import pathlib
import subprocess
import sys
from typing import Callable, Dict, List, Sequence

import torch
from filelock import FileLock

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TWO_CHANNEL_CONFIG = os.path.join(HERE, "configs", "two_channel.pbtxt")
RETRIEVAL_CONFIG = os.path.join(HERE, "configs", "retrieval.pbtxt")
#: Sizes of the shared retrieval package (:func:`retrieval_package_dir`).
RETRIEVAL_NUM_ITEMS = 50
RETRIEVAL_MAX_BATCH = 8
RETRIEVAL_MAX_SEQ_LEN = 64

#: Tolerances of package / exported-program outputs vs eager ``model.eval()`` (float32 models).
#: High precision: inductor reorders float32 sums; about 1e-7 observed (2026-11-25, CPU).
FP32_ATOL = FP32_RTOL = 1e-5
#: Models with an FP8 channel: a ~1e-7 change of q/k/v can move one value across an e4m3
#: rounding boundary in the fused package, changing an output by a fraction of one FP8 step.
#: Observed: no such flip, about 1e-7 (20 batches). The FP8 tests also check that FP8 and
#: high-precision outputs differ by far more than this, so the bound still catches a wrong path.
FP8_ATOL = FP8_RTOL = 1e-3


def ranking_batch(
    history_lengths: Sequence[Sequence[int]],
    num_targets: Sequence[int],
    num_items: int,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """A ranking request batch.

    Args:
        history_lengths: per channel, ``B`` history lengths.
        num_targets: ``B`` candidate counts.
        num_items: ids are drawn from ``[0, num_items)``.
        seed: RNG seed.

    Returns:
        The flat inputs of ``HSTURanking.forward`` by name (int64).
    """
    generator = torch.Generator().manual_seed(seed)
    flat = [n for channel in history_lengths for n in channel]
    total = sum(flat)
    stamps = [torch.sort(torch.randint(0, 5_000_000, (n,), generator=generator)).values for n in flat]
    targets = sum(num_targets)
    request_time = torch.randint(5_000_000, 6_000_000, (len(num_targets),), generator=generator)
    return {
        "history_ids": torch.randint(0, num_items, (total,), generator=generator),
        "history_lengths": torch.tensor(flat, dtype=torch.int64),
        "history_timestamps": torch.cat(stamps) if stamps else torch.zeros(0, dtype=torch.int64),
        "history_actions": torch.randint(0, 4, (total,), generator=generator),
        "candidate_ids": torch.randint(0, num_items, (targets,), generator=generator),
        "num_targets": torch.tensor(list(num_targets), dtype=torch.int64),
        "candidate_timestamps": torch.repeat_interleave(request_time, torch.tensor(list(num_targets))),
    }


def retrieval_batch(lengths: Sequence[int], num_items: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A retrieval request batch: ``item_ids [L]``, ``lengths [B]``, ``timestamps [L]``."""
    generator = torch.Generator().manual_seed(seed)
    stamps = [torch.sort(torch.randint(0, 5_000_000, (n,), generator=generator)).values for n in lengths]
    return {
        "item_ids": torch.randint(0, num_items, (sum(lengths),), generator=generator),
        "lengths": torch.tensor(list(lengths), dtype=torch.int64),
        "timestamps": torch.cat(stamps),
    }


def eager_output(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The eager oracle: ``model.eval()`` on the batch (retrieval gets ``max(lengths)``)."""
    model.eval()
    with torch.no_grad():
        if "lengths" in batch:
            return model(batch["item_ids"], batch["lengths"], batch["timestamps"], int(batch["lengths"].max()))
        return model(**batch)


def cli_status(main: Callable[..., int], argv: Sequence[str]) -> int:
    """Exit status of ``run_cli(main, argv)`` (the ``python -m`` entry), in this process."""
    from torchrec_hstu.cli import run_cli

    try:
        run_cli(main, list(argv))
    except SystemExit as done:
        return int(done.code or 0)
    raise AssertionError("run_cli returned instead of exiting")


def to_lists(batch: Dict[str, torch.Tensor]) -> Dict[str, List[int]]:
    """The JSON form of a batch."""
    return {name: tensor.tolist() for name, tensor in batch.items()}


def run_module(module: str, args: Sequence[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root (captured output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_module_script(script: str, args: Sequence[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -c <script> <args>`` from the repository root (captured output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def shared_build(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """A directory built once per test session, also across pytest-xdist workers.

    ``make test`` runs ``-n 2``: tests of one module may land on both workers, and a module
    fixture would compile the package twice. The first worker builds under a file lock in the
    session's shared temp root; the other waits and reuses it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory = root / name
    with FileLock(str(root / f"{name}.lock")):
        done = directory / "DONE"
        if not done.exists():
            directory.mkdir(exist_ok=True)
            build(directory)
            done.write_text("ok")
    return directory


def retrieval_package_dir(tmp_path_factory) -> pathlib.Path:
    """The retrieval package every test module shares (compiled once per session).

    ``configs/retrieval.pbtxt``, a random model (seed 5) saved as ``state.pt`` and exported with
    the Python API to ``retrieval.pt2`` + ``retrieval.json``.
    """
    from torchrec_hstu.config import load_config
    from torchrec_hstu.export import export_model
    from torchrec_hstu.models.build import build_model_from_config

    def build(directory: pathlib.Path) -> None:
        torch.manual_seed(5)
        model = build_model_from_config(load_config(RETRIEVAL_CONFIG), num_items=RETRIEVAL_NUM_ITEMS).eval()
        torch.save(model.state_dict(), directory / "state.pt")
        out = str(directory / "retrieval.pt2")
        result = export_model(
            model, out, max_batch_size=RETRIEVAL_MAX_BATCH, max_seq_len=RETRIEVAL_MAX_SEQ_LEN,
            inductor_configs={"aot_inductor.debug_compile": True},
        )
        assert result.package_path == out and os.path.isfile(result.signature_path)

    return shared_build(tmp_path_factory, "export_retrieval", build)
