"""The example trainers end a user error with one line ``error: ...`` and exit status 2."""

import importlib.util
import os

import pytest

from torchrec_hstu.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_ranking_bad_config_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCHREC_HSTU_DEBUG", raising=False)
    ranking = _load("train_ranking")
    config = tmp_path / "zero_heads.pbtxt"
    text = open(os.path.join(REPO, "examples", "configs", "ranking_two_channel.pbtxt")).read()
    config.write_text(text.replace("num_heads: 2", "num_heads: 0", 1))
    argv = ["--config", str(config), "--num-users", "20", "--num-items", "30", "--history-len", "4",
            "--num-candidates", "2", "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as done:
        run_cli(ranking.main, argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "num_heads" in err, err
