"""Issue 20: every bad input to export / predict ends in one line ``error: ...`` and exit status 2.

Table-driven over the shared retrieval package (``export_helpers.retrieval_package_dir``,
compiled once per session): each case makes its bad file from that package or its checkpoint,
runs the CLI entry the way ``python -m`` does (:func:`torchrec_hstu.cli.run_cli`) and checks
the exit status, that stderr is exactly one line holding the expected words, and that no
traceback is printed. The silent cases of the issue (mismatched ``.pt2`` / ``.json``, changed
package bytes, out-of-order or overflowing timestamps) are refusals here.
"""

import json
import os
import shutil
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import pytest
import torch

from export_helpers import (
    RETRIEVAL_CONFIG,
    RETRIEVAL_NUM_ITEMS,
    cli_status,
    retrieval_batch,
    retrieval_package_dir,
    run_module,
    to_lists,
)
from torchrec_hstu import export, predict
from torchrec_hstu.cli import UserError
from torchrec_hstu.config import load_config, parse_config
from torchrec_hstu.export import ModelSignature, check_export_options, compile_package
from torchrec_hstu.models.build import build_model_from_config


class _CodeInPickle:
    """Pickles as a call of ``os.getcwd`` (a GLOBAL that weights_only loading must refuse)."""

    def __reduce__(self):
        return (os.getcwd, ())


class Case(NamedTuple):
    """``make(tmp_path, package_dir) -> argv``; stderr must hold every word of ``expect``."""

    main: Callable[..., int]
    make: Callable[..., List[str]]
    expect: Sequence[str]
    forbid: Sequence[str] = ()


def _copy_pair(tmp_path, package_dir, name="model") -> Tuple[str, str]:
    package, signature = str(tmp_path / f"{name}.pt2"), str(tmp_path / f"{name}.json")
    shutil.copy(package_dir / "retrieval.pt2", package)
    shutil.copy(package_dir / "retrieval.json", signature)
    return package, signature


def _requests(tmp_path, **changes) -> str:
    batch = to_lists(retrieval_batch([3, 2], RETRIEVAL_NUM_ITEMS, seed=11))
    batch.update(changes)
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(batch) + "\n")
    return str(path)


def _predict(tmp_path, package_dir, edit_package=None, edit_signature=None, **request_changes) -> List[str]:
    package, signature = _copy_pair(tmp_path, package_dir)
    if edit_package is not None:
        data = bytearray(open(package, "rb").read())
        with open(package, "wb") as handle:
            handle.write(edit_package(data))
    if edit_signature is not None:
        with open(signature) as handle:
            payload = json.load(handle)
        edit_signature(payload)
        with open(signature, "w") as handle:
            json.dump(payload, handle)
    return ["--package", package, "--input", _requests(tmp_path, **request_changes)]


def _export(tmp_path, checkpoint: str, *extra: str) -> List[str]:
    return ["--config", RETRIEVAL_CONFIG, "--checkpoint", checkpoint, "--out", str(tmp_path / "out.pt2"), *extra]


def _truncated_checkpoint(tmp_path, package_dir) -> List[str]:
    data = (package_dir / "state.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    return _export(tmp_path, str(tmp_path / "truncated.pt"))


def _other_hidden_dim(tmp_path, package_dir) -> List[str]:
    text = open(RETRIEVAL_CONFIG).read().replace("hidden_dim: 8", "hidden_dim: 12")
    model = build_model_from_config(parse_config(text), num_items=RETRIEVAL_NUM_ITEMS)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wide.pt")
    return _export(tmp_path, str(tmp_path / "wide.pt"))


def _code_in_checkpoint(tmp_path, package_dir) -> List[str]:
    state = torch.load(package_dir / "state.pt", weights_only=True)
    torch.save({"model": state, "hook": _CodeInPickle()}, tmp_path / "code.pt")
    return _export(tmp_path, str(tmp_path / "code.pt"))


def _cuda_float32(tmp_path, package_dir) -> List[str]:
    return _export(tmp_path, str(package_dir / "state.pt"), "--device", "cuda")


def _code_in_request_file(tmp_path, package_dir) -> List[str]:
    argv = _predict(tmp_path, package_dir)
    batch = {name: torch.tensor(values) for name, values in json.loads(open(argv[-1]).read()).items()}
    torch.save([batch, _CodeInPickle()], tmp_path / "requests.pt")
    return argv[:-1] + [str(tmp_path / "requests.pt")]


def _flip_middle_byte(data: bytearray) -> bytes:
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _bigger_table_signature(payload: Dict) -> None:
    # The .json of another export of a model with a larger table (digest of this package kept):
    # ids up to 2 * N would pass the request checks and index past the package's table.
    payload["num_items"] = 2 * RETRIEVAL_NUM_ITEMS
    payload["model_sizes"]["num_items"] = 2 * RETRIEVAL_NUM_ITEMS


CASES: Dict[str, Case] = {
    "export: truncated checkpoint": Case(export.main, _truncated_checkpoint, ["truncated.pt", "not a readable torch checkpoint"]),
    "export: checkpoint of another hidden dim": Case(
        export.main, _other_hidden_dim, ["wide.pt", "hstu[0].stu.hidden_dim", "checkpoint has 12", "config 8"]
    ),
    "export: checkpoint holding code": Case(
        export.main, _code_in_checkpoint, ["code.pt", "refused", "getcwd"], forbid=["weights_only"]
    ),
    "export: CUDA without mixed precision": Case(export.main, _cuda_float32, ["--mixed-precision bf16"]),
    "predict: truncated package": Case(
        predict.main,
        lambda t, d: _predict(t, d, edit_package=lambda data: bytes(data[: len(data) // 2])),
        ["model.pt2", "not the package", "truncated"],
    ),
    "predict: bytes changed inside the package": Case(
        predict.main, lambda t, d: _predict(t, d, edit_package=_flip_middle_byte), ["model.pt2", "sha256"]
    ),
    "predict: signature of another export (larger table)": Case(
        predict.main,
        lambda t, d: _predict(t, d, edit_signature=_bigger_table_signature),
        ["model.pt2", "num_items: package 50, signature 100"],
    ),
    "predict: request file holding code": Case(
        predict.main, _code_in_request_file, ["requests.pt", "refused", "getcwd"], forbid=["weights_only"]
    ),
    "predict: item id 10^20": Case(
        predict.main, lambda t, d: _predict(t, d, item_ids=[10**20, 1, 2, 3, 4]), ["item_ids", "element 0", "int64"]
    ),
    "predict: timestamps out of order": Case(
        predict.main,
        lambda t, d: _predict(t, d, timestamps=[10, 30, 20, 5, 6]),
        ["timestamps must be non-decreasing", "element 2"],
    ),
    "predict: timestamps whose difference overflows int64": Case(
        predict.main,
        lambda t, d: _predict(t, d, timestamps=[-(2**63), 0, 2**63 - 1, 5, 6]),
        ["timestamps must be seconds >= 0", "element 0"],
    ),
}


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    return retrieval_package_dir(tmp_path_factory)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(name, package_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    case = CASES[name]
    argv = case.make(tmp_path, package_dir)
    capsys.readouterr()
    status = cli_status(case.main, argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (name, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    for word in case.expect:
        assert word in err, (name, word, err)
    for word in case.forbid:
        assert word not in err, (name, word, err)
    assert "Traceback" not in err and captured.out == ""


def test_the_shared_package_itself_predicts(package_dir, tmp_path, capsys):
    """The cases above fail for their one defect: the untouched pair and request are accepted."""
    assert cli_status(predict.main, _predict(tmp_path, package_dir)) == 0
    assert json.loads(capsys.readouterr().out)["batch"] == 0


def test_python_m_export_is_one_line_and_debug_shows_the_traceback(tmp_path, package_dir, capsys, monkeypatch):
    """``python -m torchrec_hstu.export`` in a new process: one line and status 2; ``--debug``
    (here in this process, same entry): the traceback instead."""
    argv = _cuda_float32(tmp_path, package_dir)
    plain = run_module("torchrec_hstu.export", argv)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1, plain.stderr
    assert plain.stderr.startswith("error: ") and "--mixed-precision" in plain.stderr
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    assert cli_status(export.main, argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "--mixed-precision" in err


def test_cuda_float32_is_refused_before_tracing():
    check_export_options("cpu", None)
    check_export_options("cuda", torch.bfloat16)
    with pytest.raises(UserError, match="--mixed-precision bf16"):
        check_export_options("cuda", None)
    with pytest.raises(UserError, match="autocast_dtype must be"):
        check_export_options("cpu", torch.float64)


def test_gap_bucket_mismatch_names_the_field(package_dir):
    state = torch.load(package_dir / "state.pt", weights_only=True)
    config = load_config(RETRIEVAL_CONFIG)
    config.num_gap_buckets = 0
    with pytest.raises(UserError, match="num_gap_buckets"):
        build_model_from_config(config, state)


@pytest.mark.parametrize("fail", [False, True])
def test_package_and_signature_are_renamed_into_place_together(fail, package_dir, tmp_path, monkeypatch):
    """compile_package writes both files under temporary names and renames them only when both
    are complete; a failed compile leaves the previous pair untouched and no temporary file."""
    out = str(tmp_path / "m.pt2")
    old_package, old_signature = _copy_pair(tmp_path, package_dir, name="m")
    before = (open(old_package, "rb").read(), open(old_signature).read())
    signature = ModelSignature.load(old_signature)

    def fake_compile(program, package_path, inductor_configs):
        assert package_path != out and os.path.dirname(package_path) == str(tmp_path)
        with open(package_path, "wb") as handle:
            handle.write(b"new package bytes")
        if fail:
            raise RuntimeError("compiler killed")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile)
    if fail:
        with pytest.raises(RuntimeError, match="compiler killed"):
            compile_package(None, signature, out)
        assert (open(old_package, "rb").read(), open(old_signature).read()) == before
    else:
        compile_package(None, signature, out)
        assert open(out, "rb").read() == b"new package bytes"
        ModelSignature.load(old_signature).check_package(out)  # the new .json names the new .pt2
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.pt2"]


def test_export_refuses_a_model_scoring_more_items_than_its_table(package_dir):
    """A retrieval model whose catalogue (``num_items``) exceeds its table's rows would index
    past the table inside the package: refused before tracing."""
    state = torch.load(package_dir / "state.pt", weights_only=True)
    model = build_model_from_config(load_config(RETRIEVAL_CONFIG), state)
    model.num_items = RETRIEVAL_NUM_ITEMS + 10
    with pytest.raises(ValueError, match="index past the table"):
        export.export_program(model, max_batch_size=4, max_seq_len=16)
