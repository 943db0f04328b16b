"""Fused Triton FP8 quantizers against the PyTorch quantizers (device).

The oracle is :func:`torchrec_hstu.ops.fp8.quantize.quantize_for_mode` run on the same CUDA
tensor: every output must be bit-identical (fp8 bytes, ``descale``, ``token_descale``,
``block_offsets``), per mode, on random jagged batches with empty and length-1 sequences, and
on values around every e4m3 rounding boundary and out of range (mode 0's plain cast), with
``exact=True``; the default (reciprocal multiply) within one fp8 step of it.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from strategies import jagged_batches  # noqa: E402
from torchrec_hstu.ops.fp8.quantize import FP8_DTYPE, quantize_for_mode  # noqa: E402

pytestmark = pytest.mark.gpu

#: (mode, colwise, block_size) for every operand variant the FP8 kernels quantize.
VARIANTS = [(0, False, 128), (1, False, 128), (1, True, 128), (2, False, 64), (2, False, 128),
            (3, False, 128), (4, False, 128), (5, False, 128)]


def _assert_identical(x, offsets, mode, colwise, block, max_seq_len, chunk=128) -> None:
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode

    ref = quantize_for_mode(x, offsets, mode, block, colwise=colwise, chunk=chunk)
    got = triton_quantize_for_mode(x, offsets, mode, block, colwise=colwise, chunk=chunk,
                                   max_seq_len=max_seq_len, exact=True)
    where = f"mode={mode} colwise={colwise} block={block} shape={tuple(x.shape)} {x.dtype}"
    assert got.values.dtype == FP8_DTYPE, where
    bad = (got.values.view(torch.uint8) != ref.values.view(torch.uint8)).sum().item()
    assert bad == 0, f"{bad} fp8 bytes differ ({where})"
    for name in ("descale", "token_descale"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape, f"{name} shape {tuple(a.shape)} != {tuple(b.shape)} ({where})"
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{name} differs ({where})"
    if ref.block_offsets is None:
        assert got.block_offsets is None, where
    else:
        assert torch.equal(got.block_offsets, ref.block_offsets), where


@settings(max_examples=20)
@given(batch=jagged_batches(max_batch=8, max_len=300), heads=st.integers(1, 4),
       dim=st.sampled_from([16, 48, 128]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       scale=st.sampled_from([1e-4, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_bit_identical_on_jagged_batches(batch, heads, dim, dtype, scale, seed):
    device = torch.device("cuda")
    offsets = batch.seq_offsets.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(batch.total_len, heads, dim, device=device, generator=gen) * scale).to(dtype)
    for mode, colwise, block in VARIANTS:
        _assert_identical(x, offsets, mode, colwise, block, batch.max_seq_len)


def test_strided_input_int32_offsets_and_long_sequences():
    """A q/k/v view of a packed [L, 3, H, D] tensor, int32 offsets, blocks past 128 tokens."""
    device = torch.device("cuda")
    lengths = [0, 1, 1000, 129, 128, 0, 257]
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    qkv = torch.randn(sum(lengths), 3, 4, 128, device=device, dtype=torch.bfloat16)
    for part in range(3):
        for mode, colwise, block in VARIANTS:
            _assert_identical(qkv[:, part], offsets, mode, colwise, block, max(lengths))


def test_default_reciprocal_within_one_step():
    """The default quantizers multiply by the reciprocal descale: against ``exact=True`` the
    descales are identical and an fp8 code moves by at most one step, rarely."""
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode

    device = torch.device("cuda")
    lengths = [0, 1, 1000, 129, 128, 0, 257]
    offsets = torch.tensor([0] + lengths, device=device).cumsum(0)
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(sum(lengths), 4, 128, device=device, generator=gen) * 3).to(torch.bfloat16)
    for mode, colwise, block in VARIANTS:
        exact, fast = (triton_quantize_for_mode(x, offsets, mode, block, colwise=colwise,
                                                max_seq_len=max(lengths), exact=flag)
                       for flag in (True, False))
        where = f"mode={mode} colwise={colwise} block={block}"
        assert torch.equal(exact.descale, fast.descale), where
        assert torch.equal(exact.token_descale, fast.token_descale), where
        a, b = (q.values.view(torch.uint8).int() for q in (exact, fast))
        assert ((a ^ b) & 0x80).eq(0).all(), where
        assert (a - b).abs().max().item() <= 1, where
        assert (a != b).sum().item() <= max(1, a.numel() // 10_000), where


def test_empty_inputs():
    device = torch.device("cuda")
    for offsets in (torch.zeros(1, dtype=torch.int64, device=device),
                    torch.zeros(4, dtype=torch.int64, device=device)):
        x = torch.randn(0, 2, 32, device=device, dtype=torch.bfloat16)
        for mode, colwise, block in VARIANTS:
            _assert_identical(x, offsets, mode, colwise, block, 0)


def test_cast_rounding_boundaries_and_out_of_range():
    """Every e4m3 midpoint and its fp32 neighbours, denormals, +-(448, 480, inf), NaN."""
    device = torch.device("cuda")
    grid = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    up, down = mids.nextafter(torch.tensor(1e30)), mids.nextafter(torch.tensor(-1e30))
    extra = torch.tensor([447.9, 448.0, 449.0, 464.0, 464.01, 470.0, 479.9, 480.0, 1e6,
                          float("inf"), float("nan"), 1e-30, 2.0**-10, 3 * 2.0**-11])
    values = torch.cat([mids, up, down, extra, -extra])
    x = values.view(-1, 1, 1).to(device)
    offsets = torch.tensor([0, x.shape[0]], device=device)
    _assert_identical(x, offsets, 0, False, 128, x.shape[0])
    finite = x[torch.isfinite(x)].view(-1, 1, 1)
    offsets = torch.tensor([0, finite.shape[0]], device=device)
    for mode, colwise, block in VARIANTS:
        _assert_identical(finite, offsets, mode, colwise, block, finite.shape[0])


def test_errors():
    from torchrec_hstu.ops.triton.fp8_attention import triton_fp8_hstu_attention
    from torchrec_hstu.ops.triton.fp8_quantize import triton_quantize_for_mode
    from torchrec_hstu.ops.common import AttentionOptions

    device = torch.device("cuda")
    x = torch.randn(8, 2, 32, device=device, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 8], device=device)
    with pytest.raises(ValueError, match="max_seq_len"):
        triton_quantize_for_mode(x, offsets, 2, 128)
    with pytest.raises(ValueError, match="fp8_quant_mode"):
        triton_quantize_for_mode(x, offsets, 6, 128, max_seq_len=8)
    with pytest.raises(ValueError, match=r"\[L, H, D\]"):
        triton_quantize_for_mode(x[0], offsets, 0, 128)
    with pytest.raises(ValueError, match="fp8_accumulation"):
        triton_fp8_hstu_attention(x, x, x, offsets, 8, 0.2, AttentionOptions(fp8_quant_mode=2),
                                  fp8_accumulation="fastest")
