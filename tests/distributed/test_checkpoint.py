"""Checkpoint safety without a process group: complete / damaged / mismatched / unsafe.

Sharded saves and re-sharding loads across world sizes are tested with real ranks in
``test_dmp_training.py``; the same code writes a single-process checkpoint here.
"""

import json
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from torchrec_hstu.distributed import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_manifest,
    read_tensors,
    save_checkpoint,
)
from torchrec_hstu.models.retrieval import HSTURetrieval

CONFIG = dict(num_items=30, embedding_dim=8, num_layers=1, num_heads=1, attention_dim=4, hidden_dim=4,
              max_seq_len=8, num_gap_buckets=4)


def _model(seed: int, **overrides) -> HSTURetrieval:
    torch.manual_seed(seed)
    kwargs = {**CONFIG, **overrides}
    return HSTURetrieval(kwargs.pop("num_items"), **kwargs)


@pytest.fixture
def saved(tmp_path):
    model = _model(0)
    path = save_checkpoint(str(tmp_path / "step_00000007"), model, progress={"global_step": 7},
                           model_config=CONFIG)
    return path, model


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_round_trip_into_a_fresh_model(saved, tmp_path):
    path, model = saved
    other = _model(1)
    info = load_checkpoint(path, other, model_config=CONFIG)
    _assert_same_weights(model, other)
    assert info.progress == {"global_step": 7}
    assert info.world_size == 1 and info.contents == ["model"]
    assert latest_checkpoint(str(tmp_path)) == path
    assert list_checkpoints(str(tmp_path)) == [path]
    tensors = read_tensors(path, prefix="model.")
    torch.testing.assert_close(tensors["model.embedding_collection.embeddings.item_table.weight"],
                               model.embedding_collection.embeddings["item_table"].weight.detach())


def test_unfinished_save_is_not_a_checkpoint(saved):
    path, _ = saved
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(CheckpointError, match="has no manifest.json: the save did not finish"):
        load_checkpoint(path, _model(1))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"), _model(1))


def test_truncated_file_is_refused(saved):
    path, _ = saved
    data = next(f for f in os.listdir(path) if f.endswith(".distcp"))
    full = os.path.join(path, data)
    size = os.path.getsize(full)
    with open(full, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"{data}: {size // 2} bytes, expected {size} \(truncated"):
        load_checkpoint(path, _model(1))


def test_altered_file_is_refused(saved):
    path, _ = saved
    full = os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".distcp")))
    with open(full, "r+b") as f:
        f.seek(os.path.getsize(full) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(path, _model(1))


def test_other_model_shapes_are_listed(saved):
    path, _ = saved
    bigger = _model(1, num_items=40)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, bigger)
    message = str(error.value)
    assert "does not match the model" in message
    assert "embedding_collection.embeddings.item_table.weight: checkpoint shape [30, 8], model shape [40, 8]" in message
    for key, value in bigger.state_dict().items():  # nothing was copied
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_other_model_config_is_named(saved):
    path, _ = saved
    with pytest.raises(CheckpointError, match=r"saved for another model: num_layers: checkpoint 1, now 2"):
        load_checkpoint(path, _model(1), model_config={**CONFIG, "num_layers": 2})


def test_missing_tensor_is_named(saved):
    path, _ = saved
    no_gap = _model(1, num_gap_buckets=0)
    extra = nn.Module()
    extra.model = no_gap
    extra.head = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="model.head.weight: not in the checkpoint"):
        load_checkpoint(path, extra)


def test_metadata_that_would_run_code_is_refused(saved, tmp_path):
    """DCP itself unpickles ``.metadata`` with plain ``pickle``: a crafted file runs code there.
    Ours resolves only an allow-list of classes, so the payload never runs."""
    path, _ = saved
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(CheckpointError, match=r"refusing to load (_?io|builtins)\.open"):
        load_checkpoint(path, _model(1), verify_files=False)
    assert not marker.exists()


def test_pickled_entry_is_refused(tmp_path):
    """A checkpoint whose entry for a model tensor is a pickled object (DCP would
    ``torch.load(weights_only=False)`` it) is refused before reading it."""
    model = nn.Linear(3, 2)
    path = save_checkpoint(str(tmp_path / "ok"), model)
    dcp.save({"model": {"weight": "not a tensor", "bias": torch.zeros(2)}},
             checkpoint_id=str(tmp_path / "bad"), no_dist=True)
    bad = str(tmp_path / "bad")
    shutil.copy(os.path.join(path, "manifest.json"), bad)
    manifest = json.load(open(os.path.join(bad, "manifest.json")))
    manifest["files"] = {}
    json.dump(manifest, open(os.path.join(bad, "manifest.json"), "w"))
    with pytest.raises(CheckpointError, match="model.weight: the checkpoint entry is a pickled object"):
        load_checkpoint(bad, nn.Linear(3, 2))


def test_manifest_of_another_format_is_refused(saved):
    path, _ = saved
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["format"] = "something-else/9"
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(CheckpointError, match="format 'something-else/9'"):
        read_manifest(path)
