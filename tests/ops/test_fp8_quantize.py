"""Properties of the FP8 quantizers (torchrec_hstu.ops.fp8.quantize).

Groups are enumerated here with plain Python loops over sequences, heads, blocks and tokens
(the oracle), independent of the scatter-based quantizers under test.
"""

from typing import List, Tuple

import pytest
import torch
from hypothesis import given, strategies as st

from strategies import JaggedBatch, jagged_batches
from torchrec_hstu.ops.fp8.quantize import (
    FP8_DTYPE,
    FP8TileSizes,
    quantize_for_mode,
    quantize_tiles,
    saturate_to_fp8,
    sequence_block_ids,
)

# descale = max(amax * fl32(1/448), 1e-6), the definition (see descale_from_amax).
RECIPROCAL_448 = torch.tensor(1.0 / 448.0, dtype=torch.float32)


BLOCK = 4  # mode 2 block and mode 1 column chunk used here: several blocks per short sequence
HEADS, DIM = 2, 3
# (name, fp8_quant_mode, colwise)
QUANTIZERS = [
    ("cast", 0, False),
    ("row", 1, False),
    ("col", 1, True),
    ("block", 2, False),
    ("sample_head", 3, False),
    ("sample", 4, False),
    ("tensor", 5, False),
]


def quantize(x: torch.Tensor, offsets: torch.Tensor, mode: int, colwise: bool):
    return quantize_for_mode(x, offsets, mode, BLOCK, colwise=colwise, chunk=BLOCK)


def groups(lengths: List[int], mode: int, colwise: bool) -> List[Tuple]:
    """Each group as an index tuple into ``x [L, H, D]`` (token slice, head slice, dim slice)."""
    out: List[Tuple] = []
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    total = sum(lengths)
    if mode == 5:
        return [(slice(0, total), slice(None), slice(None))]
    for start, n in zip(starts, lengths):
        if mode == 4:
            out.append((slice(start, start + n), slice(None), slice(None)))
            continue
        for h in range(HEADS):
            if mode == 3:
                out.append((slice(start, start + n), slice(h, h + 1), slice(None)))
            elif mode == 2 or (mode == 1 and colwise):
                for b0 in range(0, n, BLOCK):
                    token_slice = slice(start + b0, start + min(n, b0 + BLOCK))
                    if mode == 2:
                        out.append((token_slice, slice(h, h + 1), slice(None)))
                    else:
                        out.extend((token_slice, slice(h, h + 1), slice(d, d + 1)) for d in range(DIM))
            elif mode == 1:
                out.extend((slice(t, t + 1), slice(h, h + 1), slice(None)) for t in range(start, start + n))
    return out


def e4m3_values(shape, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 896 - 448).to(FP8_DTYPE).float()


def half_step(y: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |y| (3 mantissa bits; subnormal spacing 2^-9 below 2^-6)."""
    mag = y.abs().clamp(min=2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(mag)) - 3) / 2


def offsets_of(batch: JaggedBatch) -> torch.Tensor:
    return batch.seq_offsets


@pytest.mark.parametrize("name,mode,colwise", QUANTIZERS)
@given(batch=jagged_batches(max_batch=4, max_len=10), seed=st.integers(0, 2**16))
def test_round_trip_exact_for_scaled_e4m3_values(name, mode, colwise, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    total = batch.total_len
    e = e4m3_values((total, HEADS, DIM), gen)
    x = e.clone()
    scales = torch.zeros(total, HEADS, DIM)
    for g in (groups(batch.lengths, mode, colwise) if mode != 0 else []):
        numel = x[g].numel()
        if numel == 0:
            continue
        # A descale with a short mantissa (so 448 * s and e * s are exact in float32) that is
        # the group's descale: fl32(448 * s * fl32(1/448)) == s (always so for powers of two).
        power = 2.0 ** int(torch.randint(-12, 4, (1,), generator=gen))
        s = float(power * (1 + int(torch.randint(0, 8, (1,), generator=gen)) / 8))
        if float(torch.tensor(448.0 * s, dtype=torch.float32) * RECIPROCAL_448) != s:
            s = power
        view = e[g].reshape(-1).clone()
        view[int(torch.randint(0, numel, (1,), generator=gen))] = 448.0 * (1 if seed % 2 else -1)
        e[g] = view.reshape(e[g].shape)
        x[g] = e[g] * s
        scales[g] = s
    q = quantize(x, offsets_of(batch), mode, colwise)
    assert q.values.dtype == FP8_DTYPE and q.values.shape == x.shape
    torch.testing.assert_close(q.values.float(), e, rtol=0, atol=0)
    if mode != 0:
        torch.testing.assert_close(q.token_descale.expand_as(x), scales, rtol=0, atol=0)
    torch.testing.assert_close(q.values.float() * q.token_descale, x, rtol=0, atol=0)


@pytest.mark.parametrize("name,mode,colwise", QUANTIZERS)
@given(batch=jagged_batches(max_batch=4, max_len=10), seed=st.integers(0, 2**16))
def test_within_half_step_and_descale_from_group_amax(name, mode, colwise, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    total = batch.total_len
    # Magnitudes spanning many binades, some exact zeros, in bf16 like real inputs.
    x = torch.randn(total, HEADS, DIM, generator=gen) * torch.exp2(torch.randint(-14, 6, (total, HEADS, 1), generator=gen).float())
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.1, torch.zeros_like(x), x).to(torch.bfloat16)
    q = quantize(x, offsets_of(batch), mode, colwise)
    d = q.token_descale.expand(total, HEADS, DIM)
    expected = torch.ones(total, HEADS, DIM)
    for g in (groups(batch.lengths, mode, colwise) if mode != 0 else []):
        if x[g].numel():
            expected[g] = max(float(x[g].float().abs().max() * RECIPROCAL_448), 1e-6)
    torch.testing.assert_close(d, expected, rtol=2**-23, atol=0)
    y = x.float() / d
    assert bool((y.abs() <= 448.0 * (1 + 2**-22)).all()) or mode == 0
    err = (q.values.float() - y.clamp(-448, 448)).abs()
    assert bool((err <= half_step(y.clamp(-448, 448))).all())


@pytest.mark.parametrize("name,mode,colwise", [qz for qz in QUANTIZERS if qz[1] != 0])
@given(batch=jagged_batches(max_batch=4, max_len=10, min_batch=1), seed=st.integers(0, 2**16))
def test_changing_one_group_changes_only_its_descale(name, mode, colwise, batch, seed):
    all_groups = [g for g in groups(batch.lengths, mode, colwise) if torch.zeros(batch.total_len, HEADS, DIM)[g].numel()]
    if not all_groups:
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch.total_len, HEADS, DIM, generator=gen)
    offsets = offsets_of(batch)
    before = quantize(x, offsets, mode, colwise).token_descale.expand_as(x).clone()
    g = all_groups[int(torch.randint(0, len(all_groups), (1,), generator=gen))]
    bumped = x.clone()
    view = bumped[g].reshape(-1).clone()
    view[0] = 100.0  # larger than any N(0, 1) draw: the group's new amax
    bumped[g] = view.reshape(bumped[g].shape)
    after = quantize(bumped, offsets, mode, colwise).token_descale.expand_as(x)
    in_group = torch.zeros_like(x, dtype=torch.bool)
    in_group[g] = True
    assert bool((after[in_group] == torch.tensor(100.0) * RECIPROCAL_448).all())
    assert bool((after[in_group] != before[in_group]).all())
    torch.testing.assert_close(after[~in_group], before[~in_group], rtol=0, atol=0)


def test_block_ids_and_bound():
    offsets = torch.tensor([0, 0, 5, 6, 14])
    block_ids, block_offsets, bound = sequence_block_ids(offsets, 14, 4)
    assert block_offsets.tolist() == [0, 0, 2, 3, 5]
    assert block_ids.tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    assert bound >= 5


@pytest.mark.parametrize("name,mode,colwise", QUANTIZERS)
def test_empty_batch_and_empty_sequences(name, mode, colwise):
    for offsets in (torch.tensor([0]), torch.tensor([0, 0, 0])):
        q = quantize(torch.zeros(0, HEADS, DIM, dtype=torch.bfloat16), offsets, mode, colwise)
        assert q.values.shape == (0, HEADS, DIM) and q.token_descale.shape[0] == 0


def test_quantize_tiles_scales_and_saturation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, generator=gen)
    x[0, 2, 5] = 50.0
    x8, scale = quantize_tiles(x, 4, 6)
    assert scale.shape == (2, 2, 2)
    tiles = x.reshape(2, 2, 4, 2, 6)
    expected = torch.clamp(tiles.abs().amax(dim=(2, 4)) * RECIPROCAL_448, min=1e-6)
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    assert float(x8[0, 2, 5].float()) == 448.0
    err = (x8.float() - x / scale.repeat_interleave(4, 1).repeat_interleave(6, 2)).abs()
    assert bool((err <= half_step(x8.float())).all())
    # all-zero tile: scale 1e-6, values 0
    x8z, sz = quantize_tiles(torch.zeros(1, 4, 6), 4, 6)
    assert float(sz) == pytest.approx(1e-6) and not bool(x8z.float().any())
    # mode 0: saturating cast, unit scales
    x8c, sc = quantize_tiles(torch.tensor([[1000.0, -1000.0, 0.3, 2.0**-12]]), 1, 4, scaled=False)
    assert x8c.float().tolist() == [[448.0, -448.0, float(torch.tensor(0.3).to(FP8_DTYPE).float()), 0.0]]
    assert sc.tolist() == [[1.0]]


def test_saturate_to_fp8():
    y = saturate_to_fp8(torch.tensor([1e6, -1e6, 449.0, 3.0]))
    assert y.float().tolist() == [448.0, -448.0, 448.0, 3.0]


def test_tile_sizes_validation_and_defaults():
    assert FP8TileSizes.for_head_dim(64).fwd_block_n == 128
    assert FP8TileSizes.for_head_dim(128).fwd_block_n == 128
    assert FP8TileSizes.for_head_dim(256).fwd_block_n == 64
    assert FP8TileSizes().padding_multiple == 128
    with pytest.raises(ValueError, match="fwd_p_rows"):
        FP8TileSizes(fwd_block_m=20, fwd_p_rows=16)
    with pytest.raises(ValueError, match="colwise_chunk"):
        FP8TileSizes(colwise_chunk=96)
    with pytest.raises(ValueError, match="fp8_quant_mode"):
        quantize_for_mode(torch.zeros(1, 1, 1), torch.tensor([0, 1]), 6, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("name,mode,colwise", QUANTIZERS)
def test_quantizers_on_cuda_match_cpu(name, mode, colwise, cuda_device):
    gen = torch.Generator().manual_seed(1)
    offsets = torch.tensor([0, 0, 7, 8, 30])
    x = torch.randn(30, HEADS, DIM, generator=gen).to(torch.bfloat16)
    cpu = quantize(x, offsets, mode, colwise)
    gpu = quantize(x.to(cuda_device), offsets.to(cuda_device), mode, colwise)
    torch.testing.assert_close(gpu.values.float().cpu(), cpu.values.float(), rtol=0, atol=0)
    torch.testing.assert_close(gpu.token_descale.cpu(), cpu.token_descale, rtol=0, atol=0)
