"""Bad input to examples/train_retrieval.py (issue 20): every user error ends with one stderr line
``error: ...`` naming the problem and exit status 2, no traceback (``--debug`` shows it).

Each case builds its own tiny data in the test; the checkpoint cases share one tiny trained run.
"""

import os
import pickle

import pytest
import torch

from torchrec_hstu.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--batch-size", "16", "--num-negatives", "8", "--embedding-dim", "8", "--attention-dim", "4",
        "--hidden-dim", "4", "--num-layers", "1", "--num-heads", "1", "--max-seq-len", "8",
        "--eval-batch-size", "64", "--no-progress", "--epochs", "1"]


def _log(users=12, per_user=5, offset=0):
    return "user,item,timestamp\n" + "".join(
        f"u{u},i{(u * 3 + t + offset) % 11},{1000 + 60 * t}\n" for u in range(users) for t in range(per_user)
    )


def _fail(retrieval, argv, capsys, monkeypatch):
    """Run the CLI; return its single stderr line (asserting status 2 and no traceback)."""
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(retrieval.cli, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


# (name, file content (str or bytes), words the error line must contain)
DATA_CASES = [
    ("empty", "", ["no interactions"]),
    ("header-only", "user,item,timestamp\n", ["no interactions"]),
    ("non-numeric-timestamp", "user,item,timestamp\nu1,a,1\nu1,b,yesterday\n", [":3:", "integer timestamp"]),
    ("float-timestamp", "u1,a,1\nu1,b,1.5\n", [":2:", "integer timestamp"]),
    ("negative-timestamp", "u1,a,1\nu1,b,-7\n", [":2:", "integer timestamp"]),
    ("short-line", "u1,a,1\nu1,b\n", [":2:", "'user,item,timestamp'"]),
    ("two-columns", "u1,a\nu1,b\nu2,c\n", [":1:", "'user,item,timestamp'"]),
    ("single-interaction-users", "u1,a,1\nu2,b,2\nu3,a,3\n",
     ["no user has at least 2 interactions", "3 users", "leave-last-out"]),
    ("undecodable-utf8", b"u\xff,a,1\nu\xfe,a,2\n", [":1:", "UTF-8"]),
]


@pytest.mark.parametrize("name, content, words", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_one_line(retrieval, tmp_path, capsys, monkeypatch, name, content, words):
    path = tmp_path / "log.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    err = _fail(retrieval, ["--data", "csv", "--data-path", str(path), "--output-dir", str(tmp_path / "out")] + TINY,
                capsys, monkeypatch)
    assert str(path) in err
    for word in words:
        assert word in err, (word, err)


def test_missing_data_path_and_bad_model(retrieval, tmp_path, capsys, monkeypatch):
    assert "--data csv needs --data-path" in _fail(retrieval, ["--data", "csv"] + TINY, capsys, monkeypatch)
    err = _fail(retrieval, ["--model", "gru"] + TINY, capsys, monkeypatch)
    assert "--model must be one or more of hstu, sasrec" in err


def test_config_with_zero_heads(retrieval, tmp_path, capsys, monkeypatch):
    with open(os.path.join(REPO, "examples", "configs", "retrieval_small.pbtxt")) as f:
        text = f.read()
    assert "num_heads: 2" in text
    config = tmp_path / "zero_heads.pbtxt"
    config.write_text(text.replace("num_heads: 2", "num_heads: 0"))
    data = tmp_path / "log.csv"
    data.write_text(_log())
    err = _fail(retrieval, ["--data", "csv", "--data-path", str(data), "--config", str(config),
                            "--output-dir", str(tmp_path / "out")] + TINY, capsys, monkeypatch)
    assert "num_heads" in err


@pytest.fixture(scope="module")
def trained(retrieval, tmp_path_factory):
    """One tiny trained run: (its data file, its output dir with checkpoint.pt)."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "log.csv"
    data.write_text(_log())
    out = root / "run"
    retrieval.main(["--data", "csv", "--data-path", str(data), "--output-dir", str(out)] + TINY)
    return data, out


def _resume_argv(data, checkpoint, out, *extra):
    return ["--data", "csv", "--data-path", str(data), "--output-dir", str(out), "--resume", str(checkpoint)] + TINY[:-2] + [
        "--epochs", "2", *extra]


def test_truncated_checkpoint(retrieval, trained, tmp_path, capsys, monkeypatch):
    data, out = trained
    blob = (out / "checkpoint.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(blob[: len(blob) // 2])
    err = _fail(retrieval, _resume_argv(data, bad, tmp_path / "o"), capsys, monkeypatch)
    assert str(bad) in err and "cannot be read" in err


def test_checkpoint_with_code_is_refused(retrieval, trained, tmp_path, capsys, monkeypatch):
    data, _ = trained
    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": print}, bad, pickle_protocol=pickle.DEFAULT_PROTOCOL)  # a GLOBAL
    err = _fail(retrieval, _resume_argv(data, bad, tmp_path / "o"), capsys, monkeypatch)
    assert str(bad) in err and "holds Python code" in err
    assert "weights_only=False" not in err and "weights_only" not in err


def test_checkpoint_of_another_hidden_dim(retrieval, trained, tmp_path, capsys, monkeypatch):
    data, out = trained
    argv = _resume_argv(data, out / "checkpoint.pt", tmp_path / "o")
    argv[argv.index("--hidden-dim") + 1] = "8"
    err = _fail(retrieval, argv, capsys, monkeypatch)
    assert "--hidden-dim 4 in the checkpoint, 8 now" in err and "--resume-anyway" in err
    # Forced: the tensors do not fit, and the error names them instead of a size-mismatch traceback.
    err = _fail(retrieval, argv + ["--resume-anyway"], capsys, monkeypatch)
    assert "does not fit the model" in err and "in the checkpoint" in err


def test_checkpoint_of_another_run_needs_resume_anyway(retrieval, trained, tmp_path, capsys, monkeypatch):
    _, out = trained
    other = tmp_path / "other.csv"
    other.write_text(_log(offset=1))  # other data, same users and catalogue size
    argv = _resume_argv(other, out / "checkpoint.pt", tmp_path / "o")
    err = _fail(retrieval, argv, capsys, monkeypatch)
    assert "is from another run" in err and "data fingerprint" in err and "--data-path" in err
    payload = retrieval.main(argv + ["--resume-anyway"])
    assert [h["epoch"] for h in payload["history"]] == [1, 2]


def test_resume_same_run_still_works(retrieval, trained, tmp_path):
    data, out = trained
    payload = retrieval.main(["--data", "csv", "--data-path", str(data), "--output-dir", str(out), "--resume"]
                             + TINY[:-2] + ["--epochs", "2"])
    assert [h["epoch"] for h in payload["history"]] == [1, 2]


def test_debug_shows_the_traceback(retrieval, tmp_path, capsys, monkeypatch):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(SystemExit) as info:
        run_cli(retrieval.cli, ["--debug", "--data", "csv", "--data-path", str(path)] + TINY)
    assert info.value.code == 2 and "Traceback" in capsys.readouterr().err
