"""Every FP8 mode (0..5) through ``torch.export`` + ``ExportedProgram.module()``, vs eager.

One model, one channel per mode (``configs/fp8_modes.pbtxt``), so a single export covers all
six modes; the AOTInductor round trip of an FP8 channel (mode 2) is in
``test_export_package.py``. Histories of up to 300 tokens span several 128-token blocks.
"""

import os

import pytest
import torch

from export_helpers import FP32_ATOL, FP32_RTOL, eager_output, ranking_batch
from torchrec_hstu.config import load_config
from torchrec_hstu.export import FP8_OP, export_program, fp8_attention_nodes
from torchrec_hstu.models.build import build_model_from_config

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "fp8_modes.pbtxt")
NUM_ITEMS = 60
MAX_BATCH = 4
MODES = [0, 1, 2, 3, 4, 5]
FLOAT8_DTYPES = {getattr(torch, name) for name in dir(torch) if name.startswith("float8")}


@pytest.fixture(scope="module")
def exported():
    """``(program, signature, FP8 model, the same weights with fp8_quant_mode = -1)``."""
    config = load_config(CONFIG)
    torch.manual_seed(3)
    model = build_model_from_config(config, num_items=NUM_ITEMS).eval()
    high_precision = build_model_from_config(config, model.state_dict(), fp8_quant_mode=-1).eval()
    program, signature = export_program(model, max_batch_size=MAX_BATCH)
    return program, signature, model, high_precision


def test_graph_holds_one_opaque_op_per_attention_call(exported):
    program, signature, model, _ = exported
    nodes = fp8_attention_nodes(program)
    assert len(nodes) == len(MODES)
    # Arguments by their schema names (the options codec sets their positions); channels are
    # traced in order.
    names = [argument.name for argument in nodes[0].target._schema.arguments]
    mode_index, max_len_index = names.index("fp8_quant_mode"), names.index("max_seq_len")
    assert [node.args[mode_index] for node in nodes] == MODES
    assert signature.fp8_quant_modes == {f"mode{m}": [m] for m in MODES}
    # max_seq_len is a traced size, not a constant baked in at export.
    assert all(isinstance(node.args[max_len_index], torch.fx.Node) for node in nodes)
    # No quantizer internals: no float8 tensor anywhere in the graph, and the only non-aten
    # op is the opaque FP8 op.
    for node in program.graph.nodes:
        value = node.meta.get("val")
        assert not (isinstance(value, torch.Tensor) and value.dtype in FLOAT8_DTYPES), node
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            namespace = node.target._schema.name.split("::")[0]
            assert namespace == "aten" or node.target._schema.name == FP8_OP, node.target


def test_dynamic_dims_keep_their_bounds(exported):
    """No guard narrowed the dims: B ranges over [1, MAX_BATCH], histories may be empty."""
    program, signature, _, _ = exported
    user_inputs = [node for node in program.graph.nodes if node.op == "placeholder"
                   and node.name in program.graph_signature.user_inputs]
    placeholders = dict(zip(signature.input_names, user_inputs))
    ranges = program.range_constraints
    batch = placeholders["num_targets"].meta["val"].shape[0].node.expr
    history = placeholders["history_ids"].meta["val"].shape[0].node.expr
    assert (int(ranges[batch].lower), int(ranges[batch].upper)) == (1, MAX_BATCH)
    assert int(ranges[history].lower) == 0


# Not the export example's shapes: B = 1 with empty histories (one token per channel sequence),
# histories longer than two 128-token blocks, a request without candidates, B = MAX_BATCH.
BATCHES = [
    ([[0]] * 6, [1]),
    ([[300, 0, 5]] * 6, [3, 1, 2]),
    ([[140, 270]] * 3 + [[1, 129]] * 3, [2, 0]),
    ([[7, 0, 33, 2]] * 6, [1, 4, 2, 1]),
]


@pytest.mark.parametrize("index", range(len(BATCHES)))
def test_every_mode_matches_eager(exported, index):
    program, _, model, high_precision = exported
    history_lengths, num_targets = BATCHES[index]
    batch = ranking_batch(history_lengths, num_targets, NUM_ITEMS, seed=index)
    want = eager_output(model, batch)
    with torch.no_grad():
        got = program.module()(*batch.values())
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)
    if batch["history_ids"].numel() > 100:
        # The FP8 path changes the result far beyond the tolerance: the comparison above
        # would catch a program that ran the attention in high precision.
        assert (eager_output(high_precision, batch) - want).abs().max() > 20 * FP32_ATOL
