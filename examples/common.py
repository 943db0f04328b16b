"""Shared pieces of the example scripts: devices, checkpoints, metrics files, plots, timing.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(path, weights_only=True)``.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch


def resolve_device(name: str) -> torch.device:
    """``"cpu"`` or ``"cuda"`` (``"cuda:N"``); raises if CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N]; got {name!r}")
    return device


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The RNG of one epoch (shuffling, negatives): a function of (seed, epoch) only, so a
    resumed run draws exactly what an uninterrupted run would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: List[Dict[str, Any]],
    args: Mapping[str, Any],
) -> None:
    """Write ``{model, optimizer, epoch, history, rng, args}`` atomically.

    ``epoch`` is the number of completed epochs; ``rng`` the global torch RNG state (dropout).
    """
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "rng": torch.get_rng_state(),
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def restore(
    checkpoint: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    """Load model, optimizer and RNG state; return the number of completed epochs."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    return int(checkpoint["epoch"])


def resume_run(
    resume: Optional[str], checkpoint_path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> Tuple[int, List[Dict[str, Any]]]:
    """``--resume`` of the trainers: ``(completed epochs, metric history)``, ``(0, [])`` when off.

    ``resume`` is None (start afresh), ``"auto"`` (this run's ``checkpoint_path``) or a path.
    """
    if not resume:
        return 0, []
    path = checkpoint_path if resume == "auto" else resume
    state = load_checkpoint(path)
    start_epoch = restore(state, model, optimizer)
    print(f"resumed from {path} after epoch {start_epoch}")
    return start_epoch, list(state["history"])


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


def plot_history(
    path: str,
    history: Sequence[Mapping[str, Any]],
    metric_keys: Sequence[str],
    baselines: Optional[Mapping[str, Mapping[str, float]]] = None,
    title: str = "",
) -> None:
    """PNG with the training loss per epoch (left) and evaluation metrics per epoch (right).

    Baseline metrics, when given, are drawn as dashed horizontal lines in each metric's color.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(13, 4.2))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["--", ":", "-."]
    for i, key in enumerate(metric_keys):
        color = colors[i % len(colors)]
        ax_metric.plot(epochs, [h["metrics"][key] for h in history], marker="o", color=color, label=f"HSTU {key}")
        for j, (name, values) in enumerate((baselines or {}).items()):
            if key in values:
                ax_metric.axhline(values[key], color=color, linestyle=styles[j % len(styles)], alpha=0.6,
                                  label=f"{name} {key}")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("evaluation")
    ax_metric.grid(alpha=0.3)
    ax_metric.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Throughput:
    """Sequences and tokens per second over the timed sections."""

    def __init__(self) -> None:
        self.sequences = 0
        self.tokens = 0
        self.seconds = 0.0
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, sequences: int, tokens: int) -> None:
        assert self._start is not None
        self.seconds += time.perf_counter() - self._start
        self.sequences += sequences
        self.tokens += tokens
        self._start = None

    def summary(self) -> Dict[str, float]:
        secs = max(self.seconds, 1e-9)
        return {
            "seconds": round(self.seconds, 3),
            "sequences": self.sequences,
            "tokens": self.tokens,
            "sequences_per_s": round(self.sequences / secs, 1),
            "tokens_per_s": round(self.tokens / secs, 1),
        }


def run_info(device: torch.device) -> Dict[str, Any]:
    """Date, command line, device, versions and git commit of this run."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_description(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "git_commit": commit,
    }


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return {
        "mean": t.mean().item(),
        "std": t.std(unbiased=True).item() if t.numel() > 1 else 0.0,
        "min": t.min().item(),
        "max": t.max().item(),
    }
