"""torchrun error records are complete (written, then renamed), and train_dmp ends a user error
with one line, exit status 2 and a parseable error record."""

import importlib.util
import json
import os

import pytest

from torchrec_hstu.cli import run_cli, write_atomic
from torchrec_hstu.distributed.errors import AtomicErrorHandler, record_errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_record_errors_writes_torchs_layout(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    @record_errors
    def failing():
        raise ValueError("bad rank input")

    with pytest.raises(ValueError, match="bad rank input"):
        failing()
    payload = json.loads(error_file.read_text())
    assert payload["message"]["message"] == "ValueError: bad rank input"
    assert "py_callstack" in payload["message"]["extraInfo"]
    assert os.listdir(tmp_path) == ["error.json"]


def test_an_interrupted_write_leaves_no_partial_record(tmp_path, monkeypatch):
    """A rank stopped mid-write (here: the rename never happens) leaves the old record or none,
    never a half-written file under the error file's name."""
    error_file = tmp_path / "error.json"

    def killed(src, dst):
        raise KeyboardInterrupt("SIGTERM from torchrun")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(error_file), json.dumps({"message": "x" * 100_000}))
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    with pytest.raises(KeyboardInterrupt):
        AtomicErrorHandler().record_exception(RuntimeError("late"))
    assert os.listdir(tmp_path) == []


def test_train_dmp_user_error_is_one_line_with_a_complete_record(tmp_path, monkeypatch, capsys):
    """In this process, as torchrun's rank 0 would run it: a user error raised on the rank
    (``--backend nccl`` on CPU, refused before the process group starts) is recorded in the
    rank's error file and printed as one line with exit status 2."""
    error_file = tmp_path / "rank0_error.json"
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29999", TORCHELASTIC_ERROR_FILE=str(error_file)).items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("train_dmp", os.path.join(REPO, "examples", "train_dmp.py"))
    train_dmp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_dmp)
    with pytest.raises(SystemExit) as done:
        run_cli(train_dmp.main, ["retrieval", "--backend", "nccl", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err == "error: --backend nccl needs --device cuda\n"
    record = json.loads(error_file.read_text())
    assert record["message"]["message"] == "UserError: --backend nccl needs --device cuda"
