"""The example scripts end to end at a tiny size: outputs, checkpoints, resume, configs, data flags."""

import importlib.util
import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_RETRIEVAL = [
    "--num-users", "120", "--num-items", "60", "--num-clusters", "3", "--ring-len", "20",
    "--min-len", "4", "--max-len", "8", "--batch-size", "32", "--num-negatives", "16",
    "--embedding-dim", "16", "--attention-dim", "8", "--hidden-dim", "8", "--num-layers", "1",
    "--max-seq-len", "16", "--no-progress",
]
TINY_RANKING = [
    "--num-users", "40", "--num-items", "50", "--history-len", "8", "--num-candidates", "3",
    "--batch-size", "16", "--no-progress",
]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ranking():
    return _load("train_ranking")


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_retrieval_outputs(retrieval, tmp_path):
    out = str(tmp_path / "run")
    payload = retrieval.main(TINY_RETRIEVAL + ["--epochs", "2", "--output-dir", out])
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["final"]) == {"HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR"}
    assert set(metrics["baselines"]) == {"most-popular", "markov-1st-order"}
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["throughput"]["tokens_per_s"] > 0 and metrics["throughput"]["sequences_per_s"] > 0
    assert metrics["final"] == payload["final"]
    with open(os.path.join(out, "training_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and {"model", "optimizer", "history", "rng"} <= set(ckpt)


def test_retrieval_resume_matches_uninterrupted_run(retrieval, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    retrieval.main(TINY_RETRIEVAL + ["--epochs", "2", "--output-dir", straight])
    retrieval.main(TINY_RETRIEVAL + ["--epochs", "1", "--output-dir", split])
    first = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    assert first["epoch"] == 1
    retrieval.main(TINY_RETRIEVAL + ["--epochs", "2", "--output-dir", split, "--resume"])
    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    _state_equal(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["optimizer"]["state"]:
        _state_equal(a["optimizer"]["state"][key], b["optimizer"]["state"][key])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["history"][-1]["metrics"] == b["history"][-1]["metrics"]


def test_retrieval_seeds_summary(retrieval, tmp_path):
    out, results = str(tmp_path / "seeds"), str(tmp_path / "results")
    result = retrieval.main(TINY_RETRIEVAL + ["--epochs", "1", "--seeds", "0,1", "--output-dir", out,
                                             "--results-dir", results])
    rows = result["summary"]["rows"]
    assert set(rows) == {"HSTU", "most-popular", "markov-1st-order"}
    per_seed = [r["final"]["HR@10"] for r in result["runs"]]
    assert rows["HSTU"]["HR@10"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert sorted(os.listdir(results))[0].endswith("-cpu-retrieval-synthetic-2seeds.json")
    with open(os.path.join(out, "seeds_summary.md")) as f:
        assert "| HSTU |" in f.read()


def test_retrieval_csv_data_and_config(retrieval, tmp_path):
    path = tmp_path / "log.csv"
    lines = ["user,item,timestamp"] + [f"u{u},i{(u * 3 + t) % 17},{1000 + 60 * t}" for u in range(30) for t in range(6)]
    path.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "csv")
    payload = retrieval.main(["--data", "csv", "--data-path", str(path), "--epochs", "1", "--output-dir", out,
                              "--config", os.path.join(REPO, "examples", "configs", "retrieval_small.pbtxt"),
                              "--batch-size", "16", "--num-negatives", "8", "--no-progress"])
    assert payload["data"]["items"] == 17 and payload["data"]["users"] == 30
    assert os.path.isfile(os.path.join(out, "metrics.json"))


def test_ranking_outputs_and_resume(ranking, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    payload = ranking.main(TINY_RANKING + ["--epochs", "2", "--output-dir", straight])
    assert set(payload["final"]) == {"AUC/is_click", "AUC/long_view"}  # tasks of the two-channel .pbtxt
    assert payload["model"]["channels"] == ["clicks", "views"]
    assert {"item-CTR", "oracle"} == set(payload["baselines"])
    with open(os.path.join(straight, "training_curves.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    ranking.main(TINY_RANKING + ["--epochs", "1", "--output-dir", split])
    ranking.main(TINY_RANKING + ["--epochs", "2", "--output-dir", split, "--resume"])
    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "checkpoint.pt"), weights_only=True)
    _state_equal(a["model"], b["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_ranking_without_config_single_channel(ranking, tmp_path):
    payload = ranking.main(TINY_RANKING + ["--epochs", "1", "--config", "none", "--channels", "uih",
                                           "--embedding-dim", "16", "--attention-dim", "8", "--hidden-dim", "8",
                                           "--output-dir", str(tmp_path / "one")])
    assert payload["model"]["channels"] == ["uih"] and set(payload["final"]) == {"AUC/click", "AUC/long_view"}
