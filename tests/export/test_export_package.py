"""CLI export of a 2-channel ranking config -> AOTInductor package -> predict, vs eager.

The config (``configs/two_channel.pbtxt``) covers, in one package: a channel with FP8 attention
(mode 2, per-block, through the opaque ``torchrec_hstu::hstu_fp8_fwd`` op and the CPU
emulation) and Semi-Local Attention, and a high-precision channel (``fp8_quant_mode = -1``)
with Semi-Local Attention and attention truncation; ``scaling_seqlen = -1``.
"""

import json
import os

import pytest
import torch

from export_helpers import (
    cli_status,
    FP8_ATOL,
    FP8_RTOL,
    TWO_CHANNEL_CONFIG,
    eager_output,
    ranking_batch,
    run_module,
    run_module_script,
    shared_build,
    to_lists,
)
from torchrec_hstu import export, predict
from torchrec_hstu.config import load_config
from torchrec_hstu.export import ModelSignature
from torchrec_hstu.models.build import build_model_from_config, load_checkpoint_state

NUM_ITEMS = 60
MAX_BATCH = 8
MAX_SEQ_LEN = 320


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """``(package path, eager model)``: a random model saved as a training checkpoint, exported
    with the CLI once per session (the AOTInductor compile dominates the test time)."""

    def build(directory):
        torch.manual_seed(7)
        model = build_model_from_config(load_config(TWO_CHANNEL_CONFIG), num_items=NUM_ITEMS)
        torch.save({"model": model.state_dict(), "epoch": 1}, directory / "ckpt.pt")
        result = run_module(
            "torchrec_hstu.export",
            ["--config", TWO_CHANNEL_CONFIG, "--checkpoint", str(directory / "ckpt.pt"),
             "--out", str(directory / "model.pt2"), "--max-batch-size", str(MAX_BATCH), "--fast-compile"],
        )
        assert result.returncode == 0, result.stderr[-4000:]

    directory = shared_build(tmp_path_factory, "export_two_channel", build)
    state = load_checkpoint_state(str(directory / "ckpt.pt"))
    eager = build_model_from_config(load_config(TWO_CHANNEL_CONFIG), state).eval()
    return str(directory / "model.pt2"), eager


@pytest.fixture(scope="module")
def predictor(package):
    return predict.Predictor(package[0])


# Shapes unlike the export example (B=3, short histories): B=1 with empty histories and one
# candidate (every channel sequence has 1 token), long histories spanning several FP8 blocks
# of 128 tokens and cut by truncation, a request without candidates, the largest batch.
BATCHES = [
    ([[0], [0]], [1]),
    ([[300, 0, 5], [20, 3, 260]], [3, 1, 2]),
    ([[4, 0], [0, 9]], [0, 2]),
    ([[3, 17, 0, 40, 1, 8, 2, 25], [0, 6, 30, 2, 2, 0, 11, 4]], [1, 2, 3, 4, 1, 2, 3, 1]),
]


def _assert_close_to_eager(eager, batch, got):
    want = eager_output(eager, batch)
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=FP8_ATOL, rtol=FP8_RTOL)
    return want


def test_signature_written_beside_package(package):
    out, eager = package
    sig_path = out[: -len(".pt2")] + ".json"
    with open(sig_path) as handle:
        payload = json.load(handle)
    signature = ModelSignature.load(sig_path)
    assert signature.model_type == "ranking"
    assert signature.input_names == [
        "history_ids", "history_lengths", "history_timestamps", "history_actions",
        "candidate_ids", "num_targets", "candidate_timestamps",
    ]
    assert payload["dims"] == {"B": [1, MAX_BATCH], "Lh": [0, 2 * MAX_BATCH * MAX_SEQ_LEN],
                               "T": [1, MAX_BATCH * MAX_SEQ_LEN]}
    assert signature.max_seq_len == MAX_SEQ_LEN  # the config's max_seq_len
    assert signature.channels == ["clicks", "views"]
    assert signature.task_names == ["is_click", "long_view"]
    assert signature.fp8_quant_modes == {"clicks": [2], "views": [-1, -1]}
    assert "torchrec_hstu.ops.fp8.export_op" in signature.op_modules
    assert signature.num_items == NUM_ITEMS
    with open(TWO_CHANNEL_CONFIG) as handle:
        assert signature.config == handle.read()


@pytest.mark.parametrize("index", range(len(BATCHES)))
def test_package_matches_eager(package, predictor, index):
    _, eager = package
    history_lengths, num_targets = BATCHES[index]
    batch = ranking_batch(history_lengths, num_targets, NUM_ITEMS, seed=index)
    _assert_close_to_eager(eager, batch, predictor(batch))


def test_predict_cli_writes_scores(package, tmp_path, capsys):
    out, eager = package
    batches = [ranking_batch(h, t, NUM_ITEMS, seed=20 + i) for i, (h, t) in enumerate(BATCHES[:2])]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(to_lists(b)) + "\n" for b in batches))
    scores = tmp_path / "scores.jsonl"
    assert cli_status(predict.main, ["--package", out, "--input", str(requests), "--output", str(scores)]) == 0
    assert "wrote 2 batches" in capsys.readouterr().err
    lines = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [line["batch"] for line in lines] == [0, 1]
    for line, batch in zip(lines, batches):
        assert line["task_names"] == ["is_click", "long_view"]
        per_request = line["scores"]
        assert [len(r) for r in per_request] == batch["num_targets"].tolist()
        got = torch.tensor([row for request in per_request for row in request])
        _assert_close_to_eager(eager, batch, got)


def _bad(tmp_path, package_path, name, content, capsys):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    status = cli_status(predict.main, ["--package", package_path, "--input", str(path)])
    return status, capsys.readouterr().err


def test_bad_inputs_are_refused_with_clear_errors(package, tmp_path, capsys):
    out, _ = package
    good = to_lists(ranking_batch([[3, 2], [1, 0]], [2, 1], NUM_ITEMS, seed=3))

    def jsonl(**changes):
        batch = dict(good)
        batch.update(changes)
        return json.dumps(batch) + "\n"

    cases = {
        "float_ids.jsonl": (jsonl(history_ids=[float(x) + 0.5 for x in good["history_ids"]]), "history_ids must be a flat list of integers"),
        "nested.jsonl": (jsonl(candidate_ids=[[1, 2], [3]]), "candidate_ids must be a flat list of integers"),
        "sum.jsonl": (jsonl(history_lengths=[3, 2, 1, 1]), "history_lengths must sum to the number of history_ids"),
        "targets.jsonl": (jsonl(num_targets=[1, 1]), "num_targets must sum to the number of candidate_ids"),
        "ids.jsonl": (jsonl(candidate_ids=[0, 1, NUM_ITEMS]), f"candidate_ids must be in [0, {NUM_ITEMS})"),
        "missing_key.jsonl": (json.dumps({k: v for k, v in good.items() if k != "history_actions"}) + "\n", "missing ['history_actions']"),
        "not_json.jsonl": ("{history_ids: 1}\n", "not valid JSON"),
        "format.csv": ("1,2,3\n", "unknown input format"),
    }
    long = ranking_batch([[MAX_SEQ_LEN], [0]], [1], NUM_ITEMS, seed=4)
    cases["too_long.jsonl"] = (json.dumps(to_lists(long)) + "\n", f"longer than the exported bound max_seq_len={MAX_SEQ_LEN}")
    wide = ranking_batch([[1] * (MAX_BATCH + 1), [1] * (MAX_BATCH + 1)], [1] * (MAX_BATCH + 1), NUM_ITEMS)
    cases["too_many.jsonl"] = (json.dumps(to_lists(wide)) + "\n", f"at most {MAX_BATCH}")
    float_tensor = ranking_batch([[3, 2], [1, 0]], [2, 1], NUM_ITEMS, seed=3)
    float_tensor["history_timestamps"] = float_tensor["history_timestamps"].float()
    cases["float.pt"] = (float_tensor, "history_timestamps must be an integer tensor")
    for name, (content, message) in cases.items():
        status, err = _bad(tmp_path, out, name, content, capsys)
        assert status == 2, name
        assert message in err, (name, err)
        assert err.startswith("error: "), err
    status = cli_status(predict.main, ["--package", out, "--input", str(tmp_path / "absent.jsonl")])
    assert status == 2 and "input file not found" in capsys.readouterr().err
    status = cli_status(predict.main, ["--package", str(tmp_path / "absent.pt2"), "--input", str(tmp_path / "float.pt")])
    assert status == 2 and "package not found" in capsys.readouterr().err


def test_fresh_process_loads_without_model_code_and_exits_nonzero(package, tmp_path):
    """``python -m torchrec_hstu.predict`` in a new process: the package loads with no model
    code, no torchrec and not the exporter (only the signature module and the op library the
    signature names); a bad batch gives a clear error and exit status 2."""
    out, _ = package
    bad = to_lists(ranking_batch([[2, 0], [1, 5]], [1, 3], NUM_ITEMS, seed=30))
    bad["history_lengths"] = [2, 2, 1, 5]
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    script = (
        "import sys, runpy; sys.argv = ['predict', '--package', sys.argv[1], '--input', sys.argv[2]]\n"
        "try:\n    runpy.run_module('torchrec_hstu.predict', run_name='__main__')\n"
        "finally:\n"
        "    loaded = sorted(m for m in sys.modules if m.startswith(('torchrec_hstu.models', 'torchrec.',\n"
        "                    'torchrec_hstu.export.exporter', 'torchrec_hstu.export.specs')))\n"
        "    print('PACKAGE LOADED' if 'torch._inductor.package' in sys.modules else 'NOT LOADED', file=sys.stderr)\n"
        "    print('MODULES', loaded, file=sys.stderr)\n"
    )
    result = run_module_script(script, [out, str(tmp_path / "bad.jsonl")])
    assert result.returncode == 2, result.stderr[-4000:]
    assert "error: " in result.stderr
    assert "history_lengths must sum to the number of history_ids" in result.stderr
    assert "PACKAGE LOADED" in result.stderr and "MODULES []" in result.stderr
    assert result.stdout == ""


def test_export_cli_refuses_bad_arguments(tmp_path, capsys):
    args = ["--config", TWO_CHANNEL_CONFIG, "--out", str(tmp_path / "m.pt2")]
    assert cli_status(export.main, args + ["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    torch.save({"model": {"embedding_collection.embeddings.item_table.weight": torch.zeros(5, 8)}}, tmp_path / "c.pt")
    assert cli_status(export.main, args + ["--checkpoint", str(tmp_path / "c.pt")]) == 2
    assert "does not match the config" in capsys.readouterr().err
    assert cli_status(export.main, ["--config", str(tmp_path / "none.pbtxt"), "--checkpoint", "x", "--out", "m.pt2"]) == 2
    assert "config not found" in capsys.readouterr().err


def test_compile_time_autotuning_is_off_for_cuda_packages_only(monkeypatch):
    # On CUDA, compile-time autotuning feeds synthetic indices to gathering kernels and trips
    # their bounds asserts (seen on the H100); CPU packages keep inductor's autotuning. Both link
    # through the compiler wrapper of torchrec_hstu.aoti_toolchain (test_aoti_toolchain.py).
    monkeypatch.delenv("TORCHREC_HSTU_AOTI_LINK", raising=False)
    cuda, cpu = export.default_inductor_configs("cuda"), export.default_inductor_configs("cpu")
    assert cuda.pop("triton.autotune_at_compile_time") is False
    assert cuda == cpu and set(cpu) == {"cpp.cxx"}
    (wrapper,) = cpu["cpp.cxx"]
    assert os.path.basename(wrapper).startswith("exclude_libs-")
