"""examples/train_retrieval.py with --model hstu,sasrec, --loss full, --eval-split valid, --recipe and --merge."""

import os

import pytest

TINY = ["--num-users", "60", "--num-items", "40", "--num-clusters", "2", "--ring-len", "12", "--min-len", "4",
        "--max-len", "7", "--batch-size", "32", "--embedding-dim", "8", "--attention-dim", "4", "--hidden-dim", "4",
        "--num-layers", "1", "--num-heads", "1", "--max-seq-len", "8", "--epochs", "1", "--no-progress"]


def test_two_models_one_table_and_merge(retrieval, tmp_path):
    both = retrieval.main(TINY + ["--model", "hstu,sasrec", "--loss", "full", "--eval-split", "valid",
                                  "--output-dir", str(tmp_path / "both")])
    rows = both["summary"]["rows"]
    assert list(rows)[:2] == ["HSTU", "SASRec"] and {"most-popular", "markov-1st-order"} <= set(rows)
    hstu, sasrec = both["runs"]
    assert hstu["baselines"] == sasrec["baselines"]  # same split
    assert hstu["args"]["eval_split"] == "valid" and sasrec["model"]["kernel"] == ["SDPA"]
    # The same two runs made in separate processes, merged: the same table.
    for model in ("hstu", "sasrec"):
        retrieval.main(TINY + ["--model", model, "--loss", "full", "--eval-split", "valid", "--seeds", "0",
                               "--output-dir", str(tmp_path / model)])
    merged = retrieval.main(["--merge", f"{tmp_path / 'hstu' / 'seeds_summary.json'},{tmp_path / 'sasrec' / 'seeds_summary.json'}",
                             "--output-dir", str(tmp_path / "merged"), "--results-dir", str(tmp_path / "results")])
    assert merged["summary"]["rows"] == rows
    written = sorted(os.listdir(tmp_path / "results"))
    assert written and written[0].endswith("-retrieval-synthetic-valid-1seeds.json")
    with open(tmp_path / "merged" / "seeds_summary.md") as f:
        text = f.read()
    assert "| SASRec |" in text and "HSTU vs SASRec" in text


def test_recipe_sets_defaults_and_flags_win(retrieval):
    args = retrieval.model_args(["--recipe", "ml-100k", "--dropout", "0.5"], "hstu", "ml-100k")
    recipe = retrieval.RECIPES["ml-100k"]["hstu"]
    assert args.loss == recipe["loss"] and args.epochs == recipe["epochs"] and args.dropout == 0.5
    assert args.shift_inputs and not retrieval.model_args(["--no-shift-inputs"], "hstu", "ml-100k").shift_inputs
    assert retrieval.model_args(["--recipe", "ml-100k"], "sasrec", "ml-100k").model == "sasrec"


def test_learning_rate_schedule(retrieval):
    args = retrieval.build_parser().parse_args(["--lr", "1.0", "--lr-schedule", "cosine", "--warmup-steps", "2"])
    lrs = [retrieval.learning_rate(args, step, 12) for step in range(12)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_shift_inputs_flag_reaches_the_loss_and_can_be_turned_off(retrieval, tmp_path):
    out = retrieval.main(TINY + ["--model", "hstu,sasrec", "--loss", "full", "--shift-inputs", "--seeds", "0",
                                 "--output-dir", str(tmp_path / "shifted")])
    assert all(r["args"]["shift_inputs"] for r in out["runs"])
    assert all(r["history"][-1]["loss"] > 0 for r in out["runs"])
    parser = retrieval.build_parser()
    parser.set_defaults(shift_inputs=True)  # as a recipe would
    assert parser.parse_args(["--no-shift-inputs"]).shift_inputs is False
