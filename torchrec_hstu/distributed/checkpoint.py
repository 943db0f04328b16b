"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP) that load safely.

A checkpoint is a folder::

    step_00000040/
        __0_0.distcp, __1_0.distcp, ...   one data file per saving rank (DCP)
        .metadata                          DCP's index of every tensor chunk
        manifest.json                      ours: progress, configs, sizes + sha256 of every file

Every rank writes only its own shards (``ShardedTensor`` item tables, replicated dense
weights are written once); DCP re-shards on load, so a checkpoint saved by ``W`` ranks loads
into ``W'`` ranks under any sharding plan, or into a plain single-process model.

Loading never runs code from the checkpoint:

* tensors are read with ``torch.load(weights_only=True)`` (DCP's own reader);
* DCP's ``.metadata`` is a pickle that DCP reads with plain ``pickle.load``; we read it with
  an unpickler that only resolves an allow-list of DCP metadata classes, ``torch.Size``,
  dtypes and layouts, and refuses everything else;
* the state we save holds tensors only (no pickled Python objects); progress and configs go
  to ``manifest.json``; a non-tensor entry in a checkpoint is refused.

A folder is a checkpoint only once ``manifest.json`` is there (rank 0 writes it after every
rank finished and renames the folder into place), so an interrupted save never looks
complete; truncated or altered files fail the size / sha256 check, and a checkpoint whose
tensors do not match the model's (names, shapes, dtypes) fails with a list of differences
before anything is copied.
"""

import dataclasses
import datetime
import io
import json
import logging
import os
import pickle
import shutil
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from torchrec_hstu.cli import file_sha256, write_atomic

logger = logging.getLogger(__name__)

#: Format tag written to (and required in) ``manifest.json``.
CHECKPOINT_FORMAT = "torchrec_hstu.dcp/1"
MANIFEST = "manifest.json"
LATEST = "latest"
_DCP_METADATA = ".metadata"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, unsafe or does not match the model."""


# -- safe reading of DCP metadata ------------------------------------------------------------

#: (module, name) pairs that DCP's ``.metadata`` pickle may reference.
_ALLOWED_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS` and torch dtypes; anything else raises."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: DCP metadata may only reference tensor metadata classes"
        )


def read_dcp_metadata(path: str) -> Metadata:
    """Read a checkpoint's DCP ``.metadata`` without executing code from it.

    Args:
        path: the checkpoint folder.

    Returns:
        The DCP :class:`Metadata` (tensor names, global shapes, chunk layout).

    Raises:
        CheckpointError: the file is missing, truncated or references a non-allowed class.
    """
    file = os.path.join(path, _DCP_METADATA)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path}: DCP index {_DCP_METADATA} is missing")
    try:
        with open(file, "rb") as f:
            metadata = _RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {_DCP_METADATA} safely: {e}") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {path}: {_DCP_METADATA} holds {type(metadata).__name__}, not DCP Metadata")
    return metadata


class _SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with :func:`read_dcp_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("per-rank DCP metadata files are not supported")
        metadata = read_dcp_metadata(str(self.path))
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is not None and hasattr(storage_meta, "load_id"):
            storage_meta.load_id = self.load_id
        return metadata


class _TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a pickled (non-tensor) entry is refused."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise CheckpointError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled Python object; "
            "only tensors are loaded"
        )


def _dcp_load(state: Dict[str, Any], path: str, no_dist: bool) -> None:
    """``dcp.load`` in place with the safe reader and planner."""
    with warnings.catch_warnings():
        # no_dist is deliberate here; DCP warns about it whenever no process group exists.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_SafeFileSystemReader(path), planner=_TensorOnlyLoadPlanner(), no_dist=no_dist)


# -- manifest ------------------------------------------------------------------------------


def _file_table(folder: str) -> Dict[str, Dict[str, Any]]:
    table = {}
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name != MANIFEST and os.path.isfile(full):
            table[name] = {"bytes": os.path.getsize(full), "sha256": file_sha256(full)}
    return table


@dataclasses.dataclass
class CheckpointInfo:
    """What ``manifest.json`` says about a checkpoint.

    Attributes:
        path: the checkpoint folder.
        progress: training position (e.g. ``global_step``, ``epoch``, ``step_in_epoch``).
        model_config: arguments that fix the model's tensors (compared on load).
        training_config: arguments of the run (informative).
        world_size: ranks that saved it.
        sharding: the sharding plan that saved it (description).
        contents: top-level state keys (``model``, ``optimizer``).
        created: ISO date.
    """

    path: str
    progress: Dict[str, int]
    model_config: Dict[str, Any]
    training_config: Dict[str, Any]
    world_size: int
    sharding: Dict[str, Any]
    contents: List[str]
    created: str


def read_manifest(path: str, verify_files: bool = True) -> CheckpointInfo:
    """Read and check ``manifest.json``; with ``verify_files`` also every file's size and sha256.

    Raises:
        CheckpointError: not a folder, no manifest (the save did not finish), another format,
            or a file missing, truncated or altered.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST}: the save did not finish, or this is not a "
            "checkpoint folder written by torchrec_hstu.distributed.save_checkpoint"
        )
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"checkpoint {path}: format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    files = manifest.get("files", {})
    if verify_files:
        problems = []
        for name, expected in files.items():
            full = os.path.join(path, name)
            if os.path.basename(name) != name or name in ("", ".", ".."):
                problems.append(f"{name!r}: not a file name inside the checkpoint folder")
                continue
            if not os.path.isfile(full):
                problems.append(f"{name}: missing")
                continue
            size = os.path.getsize(full)
            if size != expected["bytes"]:
                problems.append(f"{name}: {size} bytes, expected {expected['bytes']} (truncated or overwritten)")
            elif file_sha256(full) != expected["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest (file altered or corrupted)")
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: " + "; ".join(problems))
    return CheckpointInfo(
        path=path,
        progress={k: int(v) for k, v in manifest.get("progress", {}).items()},
        model_config=dict(manifest.get("model_config", {})),
        training_config=dict(manifest.get("training_config", {})),
        world_size=int(manifest.get("world_size", 1)),
        sharding=dict(manifest.get("sharding", {})),
        contents=list(manifest.get("contents", [])),
        created=str(manifest.get("created", "")),
    )


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return diffs


# -- state -----------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world_size() > 1:
        dist.barrier()


def _broadcast_error(error: Optional[str]) -> None:
    """Raise the same :class:`CheckpointError` on every rank when any rank found one."""
    if _world_size() == 1:
        if error:
            raise CheckpointError(error)
        return
    errors: List[Optional[str]] = [None] * _world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)


def _state(model: nn.Module, optimizer: Optional[Any]) -> Dict[str, Any]:
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()["state"]
    return state


def _flatten(state: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _global_shape(value: Any) -> Tuple[int, ...]:
    return tuple(value.size())


def _check_against_metadata(path: str, state: Mapping[str, Any], metadata: Metadata) -> Optional[str]:
    """Differences between the tensors we want to load and what the checkpoint holds."""
    saved = metadata.state_dict_metadata
    problems = []
    for name, value in _flatten(state).items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name}: the model entry is {type(value).__name__}, not a tensor")
            continue
        entry = saved.get(name)
        if entry is None:
            problems.append(f"{name}: not in the checkpoint")
        elif not isinstance(entry, TensorStorageMetadata):
            problems.append(f"{name}: the checkpoint entry is a pickled object, not a tensor")
        elif tuple(entry.size) != _global_shape(value):
            problems.append(f"{name}: checkpoint shape {list(entry.size)}, model shape {list(_global_shape(value))}")
        elif entry.properties.dtype != value.dtype:
            problems.append(f"{name}: checkpoint dtype {entry.properties.dtype}, model dtype {value.dtype}")
    if not problems:
        return None
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    return f"checkpoint {path} does not match the model: " + "; ".join(shown)


def _init_optimizer_state(optimizer: Any) -> None:
    """Create lazily allocated optimizer state (torchrec ``KeyedOptimizer.init_state``) so
    DCP can load into it in place. Fused embedding optimizers already have theirs."""
    parts = optimizer.optimizers if hasattr(optimizer, "optimizers") else [("", optimizer)]
    for _, part in parts:
        if len(part.state) == 0 and len(part.params) > 0 and hasattr(part, "init_state"):
            part.init_state()


# -- public API ------------------------------------------------------------------------------


def checkpoint_path(directory: str, global_step: int) -> str:
    """``<directory>/step_<global_step, 8 digits>``."""
    return os.path.join(directory, f"step_{global_step:08d}")


def latest_checkpoint(directory: str) -> Optional[str]:
    """The folder named by ``<directory>/latest`` (written after each complete save), or None."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    if not name or os.sep in name or name.startswith("."):
        raise CheckpointError(f"{pointer} must hold a checkpoint folder name; got {name!r}")
    return os.path.join(directory, name)


def save_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    progress: Optional[Mapping[str, int]] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    training_config: Optional[Mapping[str, Any]] = None,
    sharding: Optional[Mapping[str, Any]] = None,
) -> str:
    """Save ``model`` (sharded or not) and ``optimizer`` state to the folder ``path``.

    Collective: every rank of the default process group calls it with the same ``path``.
    Files go to ``path + ".partial"`` first; rank 0 writes ``manifest.json`` after every rank
    finished, renames the folder to ``path`` and points ``<parent>/latest`` at it.

    Args:
        path: checkpoint folder to create (replaced if it exists).
        model: the module whose ``state_dict()`` is saved (e.g. ``dmp.module.model``: its
            item tables are ``ShardedTensor``, its dense weights plain tensors).
        optimizer: a torchrec ``KeyedOptimizer`` (e.g. the ``CombinedOptimizer`` of
            :func:`~torchrec_hstu.distributed.build_optimizer`); its tensor state is saved.
        progress: integer counters (``global_step``, ``epoch``, ...).
        model_config: JSON-able arguments that fix the model's tensors (checked on load).
        training_config: JSON-able arguments of the run (recorded).
        sharding: JSON-able description of the sharding plan (recorded).

    Returns:
        ``path``.
    """
    rank = _rank()
    partial = path + ".partial"
    if rank == 0:
        for stale in (partial,):
            if os.path.exists(stale):
                shutil.rmtree(stale)
        os.makedirs(partial)
    _barrier()
    state = _state(model, optimizer)
    dcp.save(state, storage_writer=FileSystemWriter(partial), no_dist=_world_size() == 1)
    _barrier()
    if rank == 0:
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "world_size": _world_size(),
            "contents": sorted(state),
            "progress": {k: int(v) for k, v in (progress or {}).items()},
            "model_config": dict(model_config or {}),
            "training_config": dict(training_config or {}),
            "sharding": dict(sharding or {}),
            "files": _file_table(partial),
        }
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(partial, path)
        parent = os.path.dirname(os.path.abspath(path))
        pointer = os.path.join(parent, LATEST)
        write_atomic(pointer, os.path.basename(os.path.abspath(path)) + "\n")
    _barrier()
    return path


def load_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    model_config: Optional[Mapping[str, Any]] = None,
    verify_files: bool = True,
) -> CheckpointInfo:
    """Load a checkpoint of :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    Works at any world size and sharding plan (DCP re-shards), and without a process group
    into a plain single-process model. Collective when a process group is initialized.

    Args:
        path: checkpoint folder.
        model: the module to fill (same structure as the saved one: sharded under DMP, or a
            plain model).
        optimizer: optional torchrec ``KeyedOptimizer`` to restore (resume training).
        model_config: when given, must equal the saved ``model_config`` (a clear error lists
            the differing fields).
        verify_files: check every file's size and sha256 against the manifest first.

    Returns:
        :class:`CheckpointInfo` (progress counters, configs).

    Raises:
        CheckpointError: missing / incomplete / damaged checkpoint, unsafe metadata, a
            different model config, or tensors whose names, shapes or dtypes differ.
    """
    error: Optional[str] = None
    info: Optional[CheckpointInfo] = None
    metadata: Optional[Metadata] = None
    try:
        info = read_manifest(path, verify_files=verify_files)
        if model_config is not None:
            diffs = _config_differences(info.model_config, model_config)
            if diffs:
                raise CheckpointError(f"checkpoint {path} was saved for another model: " + "; ".join(diffs))
        if optimizer is not None and "optimizer" not in info.contents:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state (contents: {info.contents})")
        metadata = read_dcp_metadata(path)
    except CheckpointError as e:
        error = str(e)
    _broadcast_error(error)
    assert info is not None and metadata is not None
    if optimizer is not None:
        _init_optimizer_state(optimizer)
    state = _state(model, optimizer)
    _broadcast_error(_check_against_metadata(path, state, metadata))
    try:
        _dcp_load(state, path, no_dist=_world_size() == 1)
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps per-rank failures in CheckpointException
        raise CheckpointError(f"checkpoint {path} could not be loaded: {e}") from e
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict({"state": state["optimizer"]})
    return info


def read_tensors(path: str, prefix: str = "", verify_files: bool = True) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (or those whose name starts with ``prefix``), unsharded.

    Needs no process group and no model: for inspection, tests and conversion.

    Args:
        path: checkpoint folder.
        prefix: e.g. ``"model."`` for the weights or ``"optimizer."`` for the optimizer state.
        verify_files: check sizes and sha256 against the manifest first.

    Returns:
        ``{name: full tensor}`` with DCP's dotted names, e.g.
        ``"model.embedding_collection.embeddings.item_table.weight"``.
    """
    read_manifest(path, verify_files=verify_files)
    metadata = read_dcp_metadata(path)
    state = {
        name: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for name, entry in metadata.state_dict_metadata.items()
        if name.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    try:
        _dcp_load(state, path, no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
    return state


def consolidate_checkpoint(path: str, out: str, verify_files: bool = True) -> str:
    """Write a (sharded) checkpoint's model weights as one unsharded ``state_dict`` file.

    The file holds tensors only (``torch.load(out, weights_only=True)``) with the model's own
    names (``embedding_collection.embeddings.<table>.weight``, ``transducer...``): what
    ``model.load_state_dict`` and ``python -m torchrec_hstu.export --checkpoint`` take.

    Args:
        path: checkpoint folder of :func:`save_checkpoint`.
        out: output file (written atomically).
        verify_files: check sizes and sha256 against the manifest first.

    Returns:
        ``out``.
    """
    tensors = read_tensors(path, prefix="model.", verify_files=verify_files)
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    state = {name[len("model."):]: value for name, value in tensors.items()}
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    torch.save(state, out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def list_checkpoints(directory: str) -> List[str]:
    """Complete checkpoint folders (with a manifest) under ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    names: Iterable[str] = sorted(os.listdir(directory))
    return [
        os.path.join(directory, n)
        for n in names
        if n.startswith("step_") and not n.endswith(".partial") and os.path.isfile(os.path.join(directory, n, MANIFEST))
    ]


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m torchrec_hstu.distributed.checkpoint CHECKPOINT --out model.pt``."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Check a sharded checkpoint and write its model weights as one state_dict file."
    )
    parser.add_argument("checkpoint", help="checkpoint folder (e.g. runs/dmp-retrieval/checkpoints/step_00000040)")
    parser.add_argument("--out", help="write the unsharded model state_dict here (torch.save, tensors only)")
    args = parser.parse_args(argv)
    try:
        info = read_manifest(args.checkpoint)
        print(f"{args.checkpoint}: saved by {info.world_size} ranks on {info.created}; progress {info.progress}")
        for table, spec in info.sharding.items():
            print(f"  {table}: {spec.get('sharding_type')} on ranks {spec.get('ranks')}")
        if args.out:
            consolidate_checkpoint(args.checkpoint, args.out, verify_files=False)
            print(f"wrote {args.out}")
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
