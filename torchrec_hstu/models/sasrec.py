"""SASRec (Kang & McAuley, 2018): the causal softmax-attention baseline GR compares HSTU with.

``item ids -> EmbeddingCollection -> * sqrt(D) + learned position embedding -> dropout ->
num_layers x [pre-LayerNorm causal multi-head softmax self-attention (SDPA) + residual,
pre-LayerNorm point-wise feed-forward (ReLU) + residual] -> LayerNorm -> L2 normalize``.

It shares the item table, the lookups, the user embedding (the output at a sequence's last
token) and full-catalogue scoring with :class:`~torchrec_hstu.models.retrieval.HSTURetrieval`
through :class:`~torchrec_hstu.models.retrieval.SequentialRetrieval`, so the same
:class:`~torchrec_hstu.models.retrieval.HSTURetrievalTrain` loss, negatives and evaluation
apply unchanged.

Positions are SASRec's: the original left-pads every sequence to ``max_seq_len`` and adds the
embedding of the absolute slot in that window, so the latest item always sits in the last
slot. Here a token ``i`` of a sequence of length ``n`` gets slot ``max_seq_len - n + i`` (the
same slots, without materializing the padding). Timestamps are ignored (SASRec has no time
encoding).

Symbols: ``B`` sequences, ``L`` tokens, ``D`` embedding dim, ``N`` catalogue size, ``S`` the
longest sequence of the batch.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from torchrec_hstu.models.retrieval import SequentialRetrieval
from torchrec_hstu.ops.jagged import jagged_token_positions, lengths_to_offsets


class SASRecBlock(nn.Module):
    """One pre-LayerNorm transformer block with causal softmax attention.

    Args:
        embedding_dim: ``D`` (divisible by ``num_heads``).
        num_heads: attention heads.
        ffn_dim: hidden width of the point-wise feed-forward layer.
        dropout_ratio: dropout on the attention weights, the residual branches and the
            feed-forward hidden layer.
    """

    def __init__(self, embedding_dim: int, num_heads: int, ffn_dim: int, dropout_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout_ratio = dropout_ratio
        self.attention_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.qkv = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.attention_out = nn.Linear(embedding_dim, embedding_dim)
        self.ffn_norm = nn.LayerNorm(embedding_dim, eps=1e-8)
        self.ffn_in = nn.Linear(embedding_dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, embedding_dim)
        self.dropout = nn.Dropout(dropout_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, S, D]`` right-padded -> ``[B, S, D]`` (padding never reaches a real token:
        it sits after every real token and the attention is causal)."""
        b, s, d = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, s, 3, self.num_heads, d // self.num_heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=self.dropout_ratio if self.training else 0.0,
            is_causal=True,
        )
        x = x + self.dropout(self.attention_out(attended.transpose(1, 2).reshape(b, s, d)))
        hidden = self.dropout(F.relu(self.ffn_in(self.ffn_norm(x))))
        return x + self.dropout(self.ffn_out(hidden))


class SASRecRetrieval(SequentialRetrieval):
    """SASRec next-item retrieval over the same item table and scoring as HSTU.

    Args:
        num_items: catalogue size ``N``.
        embedding_dim: ``D`` (divisible by ``num_heads``).
        num_layers: transformer blocks.
        num_heads: attention heads.
        max_seq_len: position slots (the longest sequence the model sees).
        dropout_ratio: embedding, attention and feed-forward dropout (SASRec: 0.2 on ML-1M).
        ffn_dim: feed-forward hidden width (default ``D``, as SASRec).
        embedding_init_std: std of the item table's normal init.
        feature_name: the id feature.
        table_name: the table (not ``items``).
        device: device of the item table.

    Example::

        >>> model = SASRecRetrieval(num_items=20, embedding_dim=16, num_layers=1, num_heads=2, max_seq_len=8)
        >>> model(torch.tensor([1, 2, 3]), torch.tensor([1, 2]), torch.tensor([0, 60, 120]), max_seq_len=2).shape
        torch.Size([2, 20])
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 1,
        max_seq_len: int = 200,
        dropout_ratio: float = 0.2,
        ffn_dim: Optional[int] = None,
        embedding_init_std: float = 0.02,
        feature_name: str = "item_id",
        table_name: str = "item_table",
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or embedding_dim % num_heads != 0:
            raise ValueError(
                f"num_heads must be > 0 and divide embedding_dim={embedding_dim}; got num_heads={num_heads}"
            )
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0; got {num_layers}")
        if max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be > 0; got {max_seq_len}")
        if not 0.0 <= dropout_ratio < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1); got {dropout_ratio}")
        self.init_item_table(num_items, embedding_dim, embedding_init_std, feature_name, table_name, device)
        self.max_seq_len = max_seq_len
        self.position_embeddings = nn.Embedding(max_seq_len, embedding_dim)
        nn.init.normal_(self.position_embeddings.weight, 0.0, embedding_init_std)
        self.input_dropout = nn.Dropout(dropout_ratio)
        self.blocks = nn.ModuleList(
            SASRecBlock(embedding_dim, num_heads, ffn_dim or embedding_dim, dropout_ratio) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(embedding_dim, eps=1e-8)

    def dense_device(self) -> torch.device:
        return self.position_embeddings.weight.device

    def encode(
        self,
        item_ids: torch.Tensor,
        lengths: torch.Tensor,
        timestamps: torch.Tensor,
        max_seq_len: int,
        extra_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Every token's output plus the raw input embeddings (see
        :meth:`SequentialRetrieval.encode`; ``timestamps`` are not used). Sequences longer
        than the model's ``max_seq_len`` must be truncated by the caller."""
        embeddings, extra = self.lookup_with_extra(item_ids, lengths, extra_ids)
        dense = self.dense_device()
        lengths = lengths.to(device=dense, dtype=torch.int64)
        total = embeddings.shape[0]
        batch_ids, positions = jagged_token_positions(lengths_to_offsets(lengths), total)
        slots = self.max_seq_len - lengths[batch_ids] + positions
        x = embeddings * math.sqrt(self.embedding_dim) + self.position_embeddings(slots.clamp(min=0))
        x = self.input_dropout(x)
        padded = x.new_zeros(lengths.numel(), max(max_seq_len, 1), self.embedding_dim)
        padded = padded.index_put((batch_ids, positions), x)
        for block in self.blocks:
            padded = block(padded)
        out = self.final_norm(padded)[batch_ids, positions]
        return F.normalize(out, dim=-1, eps=1e-6), embeddings, extra
