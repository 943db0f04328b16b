"""Tracing of the Triton ops under torch.export (no GPU needed: fake impls), wherever Triton imports."""

import pytest
import torch

pytest.importorskip("triton")


def test_triton_op_traces_with_data_dependent_max_seq_len(monkeypatch):
    """Export of a model whose max_seq_len is read from the lengths (an unbacked size, as the
    export module does) must keep it symbolic: the GPU export round trip failed on
    ``int(max_seq_len)`` before. Tracing needs no GPU (fake impls), so this runs wherever Triton
    imports."""
    import torchrec_hstu.ops.triton.hstu_attention as triton_attention
    from torchrec_hstu.ops import AttentionOptions, hstu_attention

    monkeypatch.setattr(triton_attention, "check_triton_inputs", lambda *args: None)

    class Model(torch.nn.Module):
        def __init__(self, mode: int) -> None:
            super().__init__()
            self.mode = mode

        def forward(self, q, k, v, lengths):
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            max_seq_len = lengths.max().item()
            torch._check(max_seq_len >= 1)
            options = AttentionOptions(fp8_quant_mode=self.mode, max_attn_len=4)
            return hstu_attention(q, k, v, offsets, max_seq_len, 0.1, options, kernel="TRITON")

    tokens = torch.export.Dim("tokens", min=2, max=1000)
    batch = torch.export.Dim("batch", min=2, max=64)
    args = (torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.tensor([4, 6]))
    for mode, op in ((-1, "triton_hstu_attention_fwd"), (2, "hstu_fp8_fwd")):
        program = torch.export.export(
            Model(mode), args, dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}, {0: batch}), strict=False
        )
        targets = [str(node.target) for node in program.graph.nodes if "torchrec_hstu" in str(node.target)]
        assert targets == [f"torchrec_hstu.{op}.default"], targets
