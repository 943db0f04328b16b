"""CUDA round trip (run on the device): export -> AOTInductor package -> predict, vs eager.

Two-channel ranking model with the TRITON kernel (and, where FBGEMM's wheel imports, the
CUTLASS kernel, whose package needs the wheel where predict runs) under bfloat16 autocast (float32 weights,
``export_model(..., autocast_dtype=torch.bfloat16)``), in high precision
(``fp8_quant_mode = -1``) and with FP8 mode 2 (per-block) on every channel; the package's FP8
op runs the kernel the model was exported with (TRITON here; it raises if that cannot run). The
eager oracle runs the same model under the same autocast with the item table on CPU
(``HSTURanking.place``; the GPU machine has no fbgemm CUDA ops); the package runs entirely on
CUDA, in a separate ``python -m torchrec_hstu.predict`` process as in serving (no torchrec, no
model code there). That also keeps a crash of the package loader (seen on the H100 with torch
2.11: a segmentation fault in ``aoti_load_package``) from taking the pytest worker with it: it
fails this test with the predict process's stderr instead.
"""

import copy
import json

import pytest
import torch

from export_helpers import eager_output, ranking_batch, run_module
from torchrec_hstu.config import parse_config
from torchrec_hstu.export import export_model, fp8_attention_nodes
from torchrec_hstu.models.build import build_model_from_config

pytestmark = pytest.mark.gpu

NUM_ITEMS = 500
MAX_BATCH = 16
# bfloat16: inductor fuses the elementwise ops around the (identical) attention kernel
# differently from eager, so values differ by a few bf16 ulps (2^-8 relative).
BF16_ATOL = BF16_RTOL = 3e-2

CONFIG = """
item_embedding_dim: 32
max_seq_len: 512
kernel: TRITON
candidate_feature_name: "candidates"
tasks { task_name: "is_click" task_bitmask: 1 }
tasks { task_name: "long_view" task_bitmask: 2 }
hstu {
  name: "clicks"
  stu { embedding_dim: 64 num_heads: 2 hidden_dim: 32 attention_dim: 32 output_dropout_ratio: 0.0 }
  input_dropout_ratio: 0.0
  attn_num_layers: 2
  positional_encoder { num_position_buckets: 513 num_time_buckets: 64 use_time_encoding: true }
  input_preprocessor { contextual_preprocessor { hidden_dim: 64 action_embedding_dim: 8 action_weights: [1, 2] } }
  output_postprocessor { layernorm_postprocessor {} }
}
hstu {
  name: "views"
  stu { embedding_dim: 64 num_heads: 2 hidden_dim: 32 attention_dim: 32 output_dropout_ratio: 0.0 }
  input_dropout_ratio: 0.0
  attn_num_layers: 2
  attn_truncation_split_layer: 1
  attn_truncation_tail_len: 64
  positional_encoder { num_position_buckets: 513 num_time_buckets: 64 use_time_encoding: true }
  input_preprocessor { contextual_preprocessor { hidden_dim: 64 action_embedding_dim: 8 action_weights: [1, 2] } }
  output_postprocessor { layernorm_postprocessor {} }
}
"""

BATCHES = [
    ([[0], [0]], [1]),
    ([[400, 0, 37], [12, 250, 3]], [5, 1, 2]),
    ([[int(n) for n in torch.randint(0, 200, (16,), generator=torch.Generator().manual_seed(0))]] * 2,
     [1 + i % 4 for i in range(16)]),
]


def _cutlass_wheel_imports() -> bool:
    from torchrec_hstu.ops.cutlass import find_cutlass_wheel

    return torch.cuda.is_available() and find_cutlass_wheel() is not None


# FBGEMM's CUTLASS kernels: head dims 64 (measured: 64, 128, 256), contexts and targets.
CUTLASS_CONFIG = (
    CONFIG.replace("kernel: TRITON", "kernel: CUTLASS")
    .replace("hidden_dim: 32 attention_dim: 32", "hidden_dim: 64 attention_dim: 64")
    .replace("embedding_dim: 64 num_heads: 2", "embedding_dim: 128 num_heads: 2")
    .replace("hidden_dim: 64 action_embedding_dim", "hidden_dim: 128 action_embedding_dim")
)


@pytest.mark.parametrize(
    "kernel,fp8_quant_mode",
    [
        ("TRITON", -1),
        ("TRITON", 2),
        pytest.param("CUTLASS", -1, marks=pytest.mark.skipif(
            not _cutlass_wheel_imports(), reason="needs a CUTLASS HSTU wheel (fbgemm_gpu.experimental.hstu)")),
    ],
)
def test_cuda_round_trip(tmp_path, kernel, fp8_quant_mode):
    torch.manual_seed(0)
    config = parse_config(CONFIG if kernel == "TRITON" else CUTLASS_CONFIG)
    model = build_model_from_config(config, num_items=NUM_ITEMS, fp8_quant_mode=fp8_quant_mode).eval()
    eager = copy.deepcopy(model).place("cuda")
    on_device = copy.deepcopy(model).to("cuda")
    out = str(tmp_path / "model.pt2")
    result = export_model(on_device, out, max_batch_size=MAX_BATCH, autocast_dtype=torch.bfloat16)
    signature = result.signature
    assert signature.device == "cuda" and signature.output_dtype == "bfloat16"
    assert signature.kernels == {"clicks": [kernel] * 2, "views": [kernel] * 2}
    assert len(fp8_attention_nodes(result.exported_program)) == (4 if fp8_quant_mode >= 0 else 0)
    with open(result.signature_path) as handle:
        assert json.load(handle)["fp8_quant_modes"] == {"clicks": [fp8_quant_mode] * 2, "views": [fp8_quant_mode] * 2}
    batches = [ranking_batch(history, targets, NUM_ITEMS, seed=index) for index, (history, targets) in enumerate(BATCHES)]
    torch.save(batches, tmp_path / "batches.pt")
    scored = run_module("torchrec_hstu.predict", ["--package", out, "--input", str(tmp_path / "batches.pt"),
                                                  "--output", str(tmp_path / "scores.jsonl")])
    assert scored.returncode == 0, f"predict exited {scored.returncode}:\n{scored.stderr[-6000:]}"
    records = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [record["batch"] for record in records] == list(range(len(BATCHES)))
    for batch, record in zip(batches, records):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = eager_output(eager, batch).float().cpu()
        got = torch.tensor([scores for request in record["scores"] for scores in request])
        assert got.shape == want.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=BF16_ATOL, rtol=BF16_RTOL)
