"""FP8 (float8_e4m3fn) quantizers of the CUTLASS HSTU kernel's ``quant_mode`` 0..5.

Symbols: ``B`` batch size, ``L`` total tokens, ``H`` heads, ``D`` head dim. A jagged tensor
``x: [L, H, D]`` with ``seq_offsets: [B + 1]`` is quantized to ``x / descale`` cast to
``float8_e4m3fn``, where ``descale = max(amax(|x| over the group) / 448, 1e-6)`` (float32) and
the group depends on the mode (``../shared/notes/anchor-cutlass-fp8.md``, notes decision 5):

======  ==========================  ==========================================  ===============
 mode    name                        group of one descale                        ``descale``
======  ==========================  ==========================================  ===============
 0       plain cast                  none (descale 1, no scaling)                ``[1]``
 1       two-direction, row-wise     one token of one head (amax over ``D``)     ``[L, H]``
 1       two-direction, column-wise  ``chunk`` tokens (aligned to the sequence   ``[NB, H, D]``
                                     start) of one head and one ``d``
 2       per-block                   ``block`` tokens (aligned to the sequence   ``[NB, H]``
                                     start) of one head
 3       per-(sample, head)          one sequence, one head                      ``[B, H]``
 4       per-sample                  one sequence                                ``[B]``
 5       per-tensor                  the whole tensor                            ``[1]``
======  ==========================  ==========================================  ===============

``NB`` is a static upper bound on the number of blocks (``(L + B * (block - 1)) // block``) so
no quantizer reads a tensor value on the host; blocks past the real ones hold descale ``1e-6``
and are never referenced. Every quantizer also returns the per-token expansion of its descale
(``token_descale``: ``[L, H, 1]``, or ``[L, H, D]`` for column-wise), which is what a kernel
multiplies by. All functions are plain tensor ops: they run on CPU and CUDA tensors, keep empty
sequences (and ``L == 0``) working, and sync nothing to the host.

The Python-side cast of q/k/v is a plain ``.to(float8_e4m3fn)`` (round to nearest even; values
cannot exceed 448 by more than rounding). Casts that happen inside the kernel (P and dS tiles)
saturate: :func:`saturate_to_fp8` clamps to +-448 first.
"""

import dataclasses
import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from torchrec_hstu.ops.jagged import jagged_token_positions, lengths_to_offsets

#: The only FP8 format of the kernel, forward and backward.
FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0
#: ``fl32(1 / 448)``: descales are ``amax * FP8_MAX_RECIPROCAL`` (see :func:`descale_from_amax`).
FP8_MAX_RECIPROCAL = float(torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))
#: Lower bound of every descale (the kernel's EPSILON).
SCALE_EPS = 1e-6
#: Default token granularity of mode 1's column-wise scales.
COLWISE_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class FP8TileSizes:
    """Tile sizes of the FP8 kernel; they also set mode 2's block sizes and P/dS scale tiles.

    Defaults are the SM90 kernel's (``FP8TileSizes.for_head_dim`` picks ``fwd_block_n``).

    Attributes:
        fwd_block_m: forward query tile (mode 2 q block size).
        fwd_block_n: forward key tile (mode 2 k/v block size; 128 for ``D <= 128``, else 64).
        fwd_p_rows: query rows sharing one forward P scale (one warp: 16 rows x ``fwd_block_n``).
        bwd_block_m: backward query tile (mode 2 q/dO block size; P and dS scale tile rows).
        bwd_block_n: backward key tile (mode 2 k/v block size; P and dS scale tile columns).
        colwise_chunk: token granularity of mode 1's column-wise scales (v forward; q, k, dO
            backward).
        bwd_row_scales: backward P and dS scales per row of the tile instead of per whole
            tile: for dV and dK one scale per key over the ``bwd_block_m`` queries of a tile,
            for dQ (a second quantization of dS) one per query over ``bwd_dq_block_n`` keys.
            Each scale stays constant along its product's reduction, as a tile scale does, so
            it factors out of the fp8 product; the row maxima need no reduction across warps
            in a kernel. The Triton kernels' "fast" accumulation at head dims <= 128; the
            CUTLASS kernel scales the whole tile (False).
        bwd_dq_block_n: with ``bwd_row_scales``, the keys one dQ row scale of dS spans (the
            query-parallel dQ kernel's key tile); divides ``bwd_block_n``, so a span never
            straddles two k blocks of mode 2. 64 rather than 128: the dQ kernel's score tiles
            are half as large and it spills far less (static ptxas, sm90a, D=128: 3.9-4.9 KB
            -> 0.6 KB of spill stores per thread; H200, N=8192: 3.74 -> 3.18-3.37 ms);
            unused (and not checked) with tile scales.
    """

    fwd_block_m: int = 128
    fwd_block_n: int = 128
    fwd_p_rows: int = 16
    bwd_block_m: int = 64
    bwd_block_n: int = 128
    colwise_chunk: int = COLWISE_CHUNK
    bwd_row_scales: bool = False
    bwd_dq_block_n: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.bwd_row_scales, bool):
            raise ValueError(f"FP8TileSizes.bwd_row_scales must be a bool; got {self.bwd_row_scales!r}")
        for field in dataclasses.fields(self):
            if field.name == "bwd_row_scales":
                continue
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"FP8TileSizes.{field.name} must be a positive int; got {value!r}")
        if self.fwd_block_m % self.fwd_p_rows:
            raise ValueError(
                f"FP8TileSizes.fwd_p_rows={self.fwd_p_rows} must divide fwd_block_m={self.fwd_block_m}"
            )
        if self.bwd_row_scales and self.bwd_block_n % self.bwd_dq_block_n:
            raise ValueError(
                f"FP8TileSizes.bwd_dq_block_n={self.bwd_dq_block_n} must divide "
                f"bwd_block_n={self.bwd_block_n} (a dQ scale span never straddles two k blocks)"
            )
        for name in ("fwd_block_n", "bwd_block_m", "bwd_block_n"):
            if self.colwise_chunk % getattr(self, name):
                raise ValueError(
                    f"FP8TileSizes.colwise_chunk={self.colwise_chunk} must be a multiple of "
                    f"{name}={getattr(self, name)} (a tile never straddles two column-scale chunks)"
                )

    @staticmethod
    def for_head_dim(head_dim: int, bwd_row_scales: bool = False) -> "FP8TileSizes":
        """The SM90 kernel's tiles for head dim ``head_dim`` (no relative attention bias).
        Cached (the instances are frozen): an eager FP8 forward+backward asks five times, and
        each construction validates every field (about 18 us of host time on CPU). A plain
        dict rather than ``functools.lru_cache``, which torch.compile warns it ignores; only
        a real bool is cached, so ``bwd_row_scales=1`` is still refused."""
        key = (head_dim, bwd_row_scales)
        tiles = _TILES_FOR_HEAD_DIM.get(key)
        if tiles is None or type(bwd_row_scales) is not bool:
            tiles = FP8TileSizes(fwd_block_n=128 if head_dim <= 128 else 64, bwd_row_scales=bwd_row_scales)
            _TILES_FOR_HEAD_DIM[key] = tiles
        return tiles

    @property
    def padding_multiple(self) -> int:
        """Padded sequence lengths are multiples of this (every tile fits a whole number of times)."""
        result = 1
        for size in (self.fwd_block_m, self.fwd_block_n, self.bwd_block_m, self.bwd_block_n):
            result = result * size // math.gcd(result, size)
        return result


_TILES_FOR_HEAD_DIM: Dict[Tuple[int, bool], FP8TileSizes] = {}


class FP8Quantized(NamedTuple):
    """A quantized jagged tensor.

    Attributes:
        values: ``[L, H, D]`` float8_e4m3fn.
        descale: float32 descales in the mode's group layout (see the module table).
        token_descale: float32 ``[L, H, 1]`` (``[L, H, D]`` column-wise): each token's descale.
        block_offsets: ``[B + 1]`` int64 first block of each sequence (block modes), else None.
    """

    values: torch.Tensor
    descale: torch.Tensor
    token_descale: torch.Tensor
    block_offsets: Optional[torch.Tensor] = None


def descale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``max(amax / 448, 1e-6)`` in float32, as ``amax * fl32(1/448)`` on every device.

    A multiplication by the float32 reciprocal, not a division: PyTorch's CUDA kernels turn
    ``x / 448.0`` into exactly this product while its CPU kernels divide, which made CPU and
    CUDA descales differ in the last bit for about half of the groups (measured on the H100).
    One expression keeps the emulation bit-identical across devices and equal to the Triton
    quantizers.
    """
    return torch.clamp(amax.float() * FP8_MAX_RECIPROCAL, min=SCALE_EPS)


def saturate_to_fp8(x: torch.Tensor) -> torch.Tensor:
    """In-kernel cast: clamp to +-448, then round to nearest even float8_e4m3fn."""
    return torch.clamp(x, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _check_jagged(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be a jagged [L, H, D] tensor; got shape {tuple(x.shape)}")


def _group_amax(values: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``amax`` of ``values: [L, *S]`` (non-negative) per group -> ``[num_groups, *S]``; 0 for empty groups."""
    out = values.new_zeros((num_groups,) + tuple(values.shape[1:]))
    index = group_ids.view((-1,) + (1,) * (values.dim() - 1)).expand_as(values)
    return out.scatter_reduce(0, index, values, reduce="amax", include_self=True)


def _quantize(x: torch.Tensor, token_descale: torch.Tensor) -> torch.Tensor:
    # (Gathers in this module use index_select: advanced indexing is slow on small CPU tensors.)
    return (x.float() / token_descale).to(FP8_DTYPE)


def sequence_block_offsets(seq_offsets: torch.Tensor, block_size: int) -> torch.Tensor:
    """First block of each sequence when every sequence is cut into ``block_size``-token blocks
    from its start: ``[B + 1]`` int64 (``ceil(length / block_size)`` summed exclusively)."""
    lengths = (seq_offsets[1:] - seq_offsets[:-1]).to(torch.int64)
    return lengths_to_offsets(torch.div(lengths + block_size - 1, block_size, rounding_mode="floor"))


def sequence_block_ids(
    seq_offsets: torch.Tensor, total_len: int, block_size: int
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Blocks of ``block_size`` tokens aligned to each sequence's start.

    Args:
        seq_offsets: ``[B + 1]``.
        total_len: ``L``.
        block_size: tokens per block.

    Returns:
        ``(block_ids [L] int64, block_offsets [B + 1] int64, num_blocks_bound)`` where
        ``block_offsets[b]`` is the first block of sequence ``b`` and ``num_blocks_bound`` a
        static (host) upper bound on the number of blocks.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive; got {block_size}")
    batch_size = seq_offsets.numel() - 1
    block_offsets = sequence_block_offsets(seq_offsets, block_size)
    batch_ids, positions = jagged_token_positions(seq_offsets.to(torch.int64), total_len)
    block_ids = block_offsets.index_select(0, batch_ids) + torch.div(positions, block_size, rounding_mode="floor")
    bound = (total_len + batch_size * (block_size - 1)) // block_size
    return block_ids, block_offsets, bound


def quantize_cast(x: torch.Tensor) -> FP8Quantized:
    """Mode 0: plain cast to float8_e4m3fn, descale 1.

    Args:
        x: ``[L, H, D]``.

    Returns:
        :class:`FP8Quantized` with ``descale [1]`` and ``token_descale [L, H, 1]`` of ones.
    """
    _check_jagged(x)
    ones = torch.ones(1, dtype=torch.float32, device=x.device)
    return FP8Quantized(x.to(FP8_DTYPE), ones, ones.expand(x.shape[0], x.shape[1], 1))


def quantize_rowwise(x: torch.Tensor) -> FP8Quantized:
    """Mode 1, row-wise: one descale per (token, head) over ``D``.

    Args:
        x: ``[L, H, D]``.

    Returns:
        :class:`FP8Quantized` with ``descale [L, H]``.
    """
    _check_jagged(x)
    if x.shape[2] == 0:
        descale = descale_from_amax(x.new_zeros(x.shape[:2], dtype=torch.float32))
    else:
        descale = descale_from_amax(x.abs().amax(dim=2))
    token_descale = descale.unsqueeze(-1)
    return FP8Quantized(_quantize(x, token_descale), descale, token_descale)


def quantize_colwise(
    x: torch.Tensor, seq_offsets: torch.Tensor, chunk: int = COLWISE_CHUNK
) -> FP8Quantized:
    """Mode 1, column-wise: one descale per (``chunk``-token block of a sequence, head, d).

    Args:
        x: ``[L, H, D]``.
        seq_offsets: ``[B + 1]``.
        chunk: tokens per block, aligned to each sequence's start.

    Returns:
        :class:`FP8Quantized` with ``descale [NB, H, D]``, ``token_descale [L, H, D]`` and
        ``block_offsets [B + 1]``.
    """
    _check_jagged(x)
    block_ids, block_offsets, bound = sequence_block_ids(seq_offsets, x.shape[0], chunk)
    descale = descale_from_amax(_group_amax(x.abs().float(), block_ids, bound))
    token_descale = descale.index_select(0, block_ids)
    return FP8Quantized(_quantize(x, token_descale), descale, token_descale, block_offsets)


def quantize_blockwise(x: torch.Tensor, seq_offsets: torch.Tensor, block_size: int) -> FP8Quantized:
    """Mode 2: one descale per (``block_size``-token block of a sequence, head).

    Args:
        x: ``[L, H, D]``.
        seq_offsets: ``[B + 1]``.
        block_size: tokens per block, aligned to each sequence's start.

    Returns:
        :class:`FP8Quantized` with ``descale [NB, H]``, ``token_descale [L, H, 1]`` and
        ``block_offsets [B + 1]``.
    """
    _check_jagged(x)
    block_ids, block_offsets, bound = sequence_block_ids(seq_offsets, x.shape[0], block_size)
    token_amax = _token_head_amax(x)
    descale = descale_from_amax(_group_amax(token_amax, block_ids, bound))
    token_descale = descale.index_select(0, block_ids).unsqueeze(-1)
    return FP8Quantized(_quantize(x, token_descale), descale, token_descale, block_offsets)


def _token_head_amax(x: torch.Tensor) -> torch.Tensor:
    if x.shape[2] == 0:
        return x.new_zeros(x.shape[:2], dtype=torch.float32)
    return x.abs().amax(dim=2).float()


def quantize_per_sample_head(x: torch.Tensor, seq_offsets: torch.Tensor) -> FP8Quantized:
    """Mode 3: one descale per (sequence, head).

    Args:
        x: ``[L, H, D]``.
        seq_offsets: ``[B + 1]``.

    Returns:
        :class:`FP8Quantized` with ``descale [B, H]``.
    """
    _check_jagged(x)
    batch_ids, _ = jagged_token_positions(seq_offsets.to(torch.int64), x.shape[0])
    descale = descale_from_amax(_group_amax(_token_head_amax(x), batch_ids, seq_offsets.numel() - 1))
    token_descale = descale.index_select(0, batch_ids).unsqueeze(-1)
    return FP8Quantized(_quantize(x, token_descale), descale, token_descale)


def quantize_per_sample(x: torch.Tensor, seq_offsets: torch.Tensor) -> FP8Quantized:
    """Mode 4: one descale per sequence.

    Args:
        x: ``[L, H, D]``.
        seq_offsets: ``[B + 1]``.

    Returns:
        :class:`FP8Quantized` with ``descale [B]``.
    """
    _check_jagged(x)
    batch_ids, _ = jagged_token_positions(seq_offsets.to(torch.int64), x.shape[0])
    token_amax = _token_head_amax(x)
    token_amax = token_amax.amax(dim=1) if x.shape[1] > 0 else token_amax.new_zeros(x.shape[0])
    descale = descale_from_amax(_group_amax(token_amax, batch_ids, seq_offsets.numel() - 1))
    token_descale = descale.index_select(0, batch_ids).view(-1, 1, 1).expand(x.shape[0], x.shape[1], 1)
    return FP8Quantized(_quantize(x, token_descale), descale, token_descale)


def quantize_per_tensor(x: torch.Tensor) -> FP8Quantized:
    """Mode 5: one descale for the whole tensor.

    Args:
        x: ``[L, H, D]``.

    Returns:
        :class:`FP8Quantized` with ``descale [1]``.
    """
    _check_jagged(x)
    # A zero prepended keeps amax defined for an empty tensor.
    flat = torch.cat([x.new_zeros(1, dtype=torch.float32), x.abs().float().reshape(-1)])
    descale = descale_from_amax(flat.amax()).reshape(1)
    token_descale = descale.view(1, 1, 1).expand(x.shape[0], x.shape[1], 1)
    return FP8Quantized(_quantize(x, token_descale), descale, token_descale)


def quantize_for_mode(
    x: torch.Tensor,
    seq_offsets: torch.Tensor,
    fp8_quant_mode: int,
    block_size: int,
    colwise: bool = False,
    chunk: int = COLWISE_CHUNK,
) -> FP8Quantized:
    """The quantizer of ``fp8_quant_mode`` for one operand.

    Args:
        x: ``[L, H, D]``.
        seq_offsets: ``[B + 1]``.
        fp8_quant_mode: 0..5.
        block_size: mode 2's block size for this operand (a kernel tile size).
        colwise: mode 1 only: the column-wise (``chunk`` tokens x 1) version instead of the
            row-wise (1 x ``D``) one; ignored by other modes.
        chunk: mode 1 column-wise token granularity.

    Returns:
        :class:`FP8Quantized`.
    """
    if fp8_quant_mode == 0:
        return quantize_cast(x)
    if fp8_quant_mode == 1:
        return quantize_colwise(x, seq_offsets, chunk) if colwise else quantize_rowwise(x)
    if fp8_quant_mode == 2:
        return quantize_blockwise(x, seq_offsets, block_size)
    if fp8_quant_mode == 3:
        return quantize_per_sample_head(x, seq_offsets)
    if fp8_quant_mode == 4:
        return quantize_per_sample(x, seq_offsets)
    if fp8_quant_mode == 5:
        return quantize_per_tensor(x)
    raise ValueError(f"fp8_quant_mode must be an int in [0, 5]; got {fp8_quant_mode!r}")


def quantize_tiles(
    x: torch.Tensor, tile_rows: int, tile_cols: int, scaled: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """In-kernel dynamic quantization of a score-like matrix (P or dS) per tile.

    Args:
        x: ``[..., R, C]`` float32 with ``R % tile_rows == 0`` and ``C % tile_cols == 0``.
        tile_rows: rows sharing one scale.
        tile_cols: columns sharing one scale.
        scaled: False for mode 0: saturating cast with scale 1.

    Returns:
        ``(x8 [..., R, C] float8_e4m3fn, scale [..., R / tile_rows, C / tile_cols] float32)``
        with ``scale = max(amax(|tile|) / 448, 1e-6)`` and ``x8 = sat(x / scale)``.
    """
    rows, cols = x.shape[-2], x.shape[-1]
    if rows % tile_rows or cols % tile_cols:
        raise ValueError(
            f"x's last two dims ({rows}, {cols}) must be multiples of the tile ({tile_rows}, {tile_cols})"
        )
    tiled = x.reshape(tuple(x.shape[:-2]) + (rows // tile_rows, tile_rows, cols // tile_cols, tile_cols))
    if not scaled:
        scale = x.new_ones(tuple(x.shape[:-2]) + (rows // tile_rows, cols // tile_cols))
        return saturate_to_fp8(x), scale
    scale = descale_from_amax(tiled.abs().amax(dim=(-3, -1)))
    x8 = saturate_to_fp8(tiled / scale.unsqueeze(-1).unsqueeze(-3))
    return x8.reshape(x.shape), scale
