"""Retrieval (``fp8_quant_mode = -1``): Python export API -> AOTInductor package -> predict."""

import json
import os

import pytest
import torch

from export_helpers import (
    FP32_ATOL,
    FP32_RTOL,
    RETRIEVAL_CONFIG as CONFIG,
    RETRIEVAL_MAX_BATCH as MAX_BATCH,
    RETRIEVAL_MAX_SEQ_LEN as MAX_SEQ_LEN,
    RETRIEVAL_NUM_ITEMS as NUM_ITEMS,
    eager_output,
    retrieval_batch,
    retrieval_package_dir,
    to_lists,
)
from torchrec_hstu import predict
from torchrec_hstu.config import load_config
from torchrec_hstu.export import export_program
from torchrec_hstu.models.build import build_model_from_config


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """``(package path, eager model)``, exported with the Python API once per session."""
    directory = retrieval_package_dir(tmp_path_factory)
    state = torch.load(directory / "state.pt", weights_only=True)
    model = build_model_from_config(load_config(CONFIG), state).eval()
    out = str(directory / "retrieval.pt2")
    signature = predict.Predictor(out).signature
    assert signature.fp8_quant_modes == {"transducer": [-1]}
    assert signature.kernels == {"transducer": ["AUTO"]}
    return out, model


@pytest.fixture(scope="module")
def predictor(package):
    return predict.Predictor(package[0])


# B = 1 with one token (the smallest program input), mixed lengths, the bound, the largest batch.
LENGTHS = [[1], [5, 1, 17], [MAX_SEQ_LEN, 2], [3, 9, 1, 30, 12, 7, 1, 64]]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_package_matches_eager(package, predictor, lengths):
    _, model = package
    batch = retrieval_batch(lengths, NUM_ITEMS, seed=len(lengths))
    got = predictor(batch)
    want = eager_output(model, batch)
    assert got.shape == (len(lengths), NUM_ITEMS)
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_predict_cli_top_k_and_all_scores(package, tmp_path, capsys):
    out, model = package
    batch = retrieval_batch([4, 11], NUM_ITEMS, seed=1)
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([to_lists(batch)]))
    want = eager_output(model, batch)
    assert predict.main(["--package", out, "--input", str(path), "--top-k", "5"]) == 0
    record = json.loads(capsys.readouterr().out)
    values, items = torch.topk(want, 5, dim=1)
    assert record["items"] == items.tolist()
    torch.testing.assert_close(torch.tensor(record["scores"]), values, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert predict.main(["--package", out, "--input", str(path), "--top-k", "0"]) == 0
    record = json.loads(capsys.readouterr().out)
    torch.testing.assert_close(torch.tensor(record["scores"]), want, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_empty_history_and_long_sequence_are_refused(package, predictor):
    batch = retrieval_batch([3, 2], NUM_ITEMS)
    batch["lengths"] = torch.tensor([5, 0])
    with pytest.raises(ValueError, match="each >= 1"):
        predictor(batch)
    with pytest.raises(ValueError, match=f"max_seq_len={MAX_SEQ_LEN}"):
        predictor(retrieval_batch([MAX_SEQ_LEN + 1], NUM_ITEMS))
    bad = retrieval_batch([3, 2], NUM_ITEMS)
    bad["timestamps"] = bad["timestamps"][:-1]
    with pytest.raises(ValueError, match="same length"):
        predictor(bad)


def test_export_api_refuses_bad_arguments():
    model = build_model_from_config(load_config(CONFIG), num_items=NUM_ITEMS)
    with pytest.raises(ValueError, match="max_seq_len must be given"):
        export_program(model)
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 2"):
        export_program(model, max_batch_size=1, max_seq_len=8)
    with pytest.raises(TypeError, match="export supports"):
        export_program(torch.nn.Linear(2, 2), max_seq_len=8)
    with pytest.raises(ValueError, match="move the whole model to the device"):
        export_program(model.place("meta"), max_seq_len=8)


def test_bf16_autocast_export_matches_eager_autocast():
    """Mixed precision: the program traced under bfloat16 autocast matches the eager model
    called under the same autocast (run through ``ExportedProgram.module()``)."""
    torch.manual_seed(6)
    model = build_model_from_config(load_config(CONFIG), num_items=NUM_ITEMS).eval()
    program, signature = export_program(
        model, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN, autocast_dtype=torch.bfloat16
    )
    assert signature.autocast_dtype == "bfloat16" and signature.output_dtype == "bfloat16"
    for lengths in ([1], [9, 40, 2]):
        batch = retrieval_batch(lengths, NUM_ITEMS, seed=len(lengths))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = eager_output(model, batch)
        with torch.no_grad():
            got = program.module()(*batch.values())
        assert got.dtype == want.dtype == torch.bfloat16
        # A few bfloat16 ulps (2^-9 at 0.25): the traced casts may round at other points.
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
