"""Export across head counts (1, 2, 4) and head dims that are and are not multiples of 16.

Issue 20: a retrieval model with ``num_heads: 1`` exported but failed inside inductor
(``GuardOnDataDependentSymNode ... 4*u0 + 4``). The matrix runs through ``torch.export`` +
``ExportedProgram.module()`` against eager (cheap); one AOTInductor compile covers the one-head
case, where the failure was.
"""

import pytest
import torch

from export_helpers import FP32_ATOL, FP32_RTOL, eager_output, retrieval_batch
from torchrec_hstu.config import parse_config
from torchrec_hstu.export import compile_package, export_program
from torchrec_hstu.models.build import build_model_from_config
from torchrec_hstu.predict import Predictor

NUM_ITEMS = 30
MAX_BATCH = 4
MAX_SEQ_LEN = 24


def _model(num_heads: int, head_dim: int) -> torch.nn.Module:
    """One STU layer, ``embedding_dim = 16``; q/k and u/v widths ``head_dim`` per head."""
    config = parse_config(
        f"""
        item_embedding_dim: 16
        max_seq_len: {MAX_SEQ_LEN}
        kernel: PYTORCH
        num_gap_buckets: 8
        hstu {{
          stu {{ embedding_dim: 16 num_heads: {num_heads} hidden_dim: {head_dim} attention_dim: {head_dim}
                 output_dropout_ratio: 0.0 }}
          input_dropout_ratio: 0.0
          attn_num_layers: 1
          positional_encoder {{ num_position_buckets: {MAX_SEQ_LEN + 1} num_time_buckets: 16 use_time_encoding: true }}
        }}
        """
    )
    torch.manual_seed(num_heads * 100 + head_dim)
    return build_model_from_config(config, num_items=NUM_ITEMS).eval()


# Head dims 12 (not a multiple of 16) and 16; every head count, both kinds of head dim.
CASES = [(1, 12), (2, 16), (4, 12)]
# One request of one token (the smallest input), then lengths unlike the export example.
BATCHES = [[1], [5, 1, MAX_SEQ_LEN]]


@pytest.fixture(scope="module")
def exported():
    """``{(num_heads, head_dim): (model, program, signature)}``, each exported once."""
    cache = {}

    def get(num_heads, head_dim):
        if (num_heads, head_dim) not in cache:
            model = _model(num_heads, head_dim)
            cache[num_heads, head_dim] = (model, *export_program(model, max_batch_size=MAX_BATCH, max_seq_len=MAX_SEQ_LEN))
        return cache[num_heads, head_dim]

    return get


@pytest.mark.parametrize("num_heads,head_dim", CASES)
def test_exported_program_matches_eager(exported, num_heads, head_dim):
    model, program, signature = exported(num_heads, head_dim)
    assert signature.model_sizes["num_items"] == NUM_ITEMS
    exported = program.module()
    for index, lengths in enumerate(BATCHES):
        batch = retrieval_batch(lengths, NUM_ITEMS, seed=index)
        with torch.no_grad():
            got = exported(*batch.values())
        torch.testing.assert_close(got, eager_output(model, batch), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_one_head_package_compiles_and_predicts(exported, tmp_path):
    model, program, signature = exported(1, 12)
    out = str(tmp_path / "one_head.pt2")
    compile_package(program, signature, out, {"aot_inductor.debug_compile": True})
    predictor = Predictor(out)
    for index, lengths in enumerate(BATCHES):
        batch = retrieval_batch(lengths, NUM_ITEMS, seed=index)
        torch.testing.assert_close(predictor(batch), eager_output(model, batch), atol=FP32_ATOL, rtol=FP32_RTOL)
