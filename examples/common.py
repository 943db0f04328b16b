"""Shared pieces of the example scripts: devices, checkpoints, metrics files, plots, timing.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(path, weights_only=True)``.
"""

import datetime
import hashlib
import json
import os
import pickle
import platform
import re
import subprocess
import sys
import time
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from torchrec_hstu.cli import UserError


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


class CheckpointError(UserError):
    """A checkpoint that cannot be read, does not fit the model, or belongs to another run."""


def plain_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The plain-valued (int, float, str, bool, None) entries of a run's arguments."""
    return {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))}


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """A short sha256 of the tensors' dtypes, shapes and bytes (the data a run trains on)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: List[Dict[str, Any]],
    args: Mapping[str, Any],
    fingerprint: Optional[str] = None,
) -> None:
    """Write ``{model, optimizer, epoch, history, rng, args[, data_fingerprint]}`` atomically.

    Args:
        path: the checkpoint file (written to ``path + ".tmp"``, then renamed).
        model: its ``state_dict`` is saved on CPU.
        optimizer: its ``state_dict``.
        epoch: number of completed epochs.
        history: per-epoch records.
        args: the run's arguments (plain values are kept; :func:`resume_run` compares them).
        fingerprint: :func:`data_fingerprint` of the training data, checked on resume.
    """
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "rng": torch.get_rng_state(),
        "args": plain_args(args),
    }
    if fingerprint is not None:
        state["data_fingerprint"] = fingerprint
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated or not a checkpoint, or it holds Python code or
            objects (a pickle ``GLOBAL``) instead of tensors and plain values.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} holds Python code or objects{what}, not only tensors and plain values; "
            "refusing to load it: checkpoints of this package are written by the trainers' save_checkpoint"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or not a torch.save file): {reason}"
        ) from None
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "history", "rng"} <= set(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a trainer checkpoint: expected keys model, optimizer, epoch, history, rng; "
            f"got {keys}"
        )
    return state


def _shape_mismatches(model: torch.nn.Module, saved: Mapping[str, Any]) -> List[str]:
    """``"name: [..] in the checkpoint, [..] in the model"`` for each differing tensor."""
    current = model.state_dict()
    out = []
    for name, tensor in saved.items():
        if name in current and isinstance(tensor, torch.Tensor) and tensor.shape != current[name].shape:
            out.append(f"{name}: {list(tensor.shape)} in the checkpoint, {list(current[name].shape)} in the model")
    return out


def restore(
    checkpoint: Mapping[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str = "checkpoint"
) -> int:
    """Load model, optimizer and RNG state; return the number of completed epochs.

    Raises:
        CheckpointError: the checkpoint's tensors do not fit ``model`` (names the tensors).
    """
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        shapes = _shape_mismatches(model, checkpoint["model"])
        saved, current = set(checkpoint["model"]), set(model.state_dict())
        detail = "; ".join(shapes[:3]) if shapes else (
            f"missing {sorted(current - saved)[:3]}, unexpected {sorted(saved - current)[:3]}"
        )
        raise CheckpointError(f"checkpoint {path} does not fit the model: {detail}") from err
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    return int(checkpoint["epoch"])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run_mismatches(
    saved: Mapping[str, Any], current: Mapping[str, Any], free: Collection[str] = ()
) -> List[str]:
    """``"--name A in the checkpoint, B now"`` for every plain argument that differs, except
    those in ``free`` (e.g. ``epochs``, ``output_dir``: a resumed run may change them)."""
    now = plain_args(current)
    names = sorted((set(saved) | set(now)) - set(free))
    return [
        f"{_flag(k)} {saved.get(k, '(unset)')!r} in the checkpoint, {now.get(k, '(unset)')!r} now"
        for k in names
        if saved.get(k) != now.get(k)
    ]


def resume_run(
    resume: Optional[str],
    checkpoint_path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    run_args: Optional[Mapping[str, Any]] = None,
    fingerprint: Optional[str] = None,
    free_args: Collection[str] = (),
    resume_anyway: bool = False,
) -> Tuple[int, List[Dict[str, Any]]]:
    """``--resume`` of the trainers: ``(completed epochs, metric history)``, ``(0, [])`` when off.

    With ``run_args`` / ``fingerprint`` given, the checkpoint must come from the same run: the
    same plain arguments (except ``free_args``) and the same data fingerprint, else a
    :class:`CheckpointError` names what differs, unless ``resume_anyway``.

    Args:
        resume: None (start afresh), ``"auto"`` (this run's ``checkpoint_path``) or a path.
        checkpoint_path: this run's checkpoint.
        model: restored in place.
        optimizer: restored in place.
        run_args: this run's arguments (compared with the checkpoint's).
        fingerprint: this run's :func:`data_fingerprint`.
        free_args: arguments a resumed run may change.
        resume_anyway: skip the same-run checks (``--resume-anyway``).
    """
    if not resume:
        return 0, []
    path = checkpoint_path if resume == "auto" else resume
    state = load_checkpoint(path)
    if not resume_anyway:
        problems = []
        if run_args is not None:
            problems += run_mismatches(state.get("args", {}), run_args, free_args)
        if fingerprint is not None and state.get("data_fingerprint") != fingerprint:
            problems.append(
                f"data fingerprint {state.get('data_fingerprint', '(none)')} in the checkpoint, {fingerprint} now"
            )
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise CheckpointError(
                f"--resume: checkpoint {path} is from another run ({shown}); "
                "pass --resume-anyway to continue from it regardless"
            )
    start_epoch = restore(state, model, optimizer, path)
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
    model_name: str = "HSTU",
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
        ax_metric.plot(epochs, [h["metrics"][key] for h in history], marker="o", color=color, label=f"{model_name} {key}")
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
