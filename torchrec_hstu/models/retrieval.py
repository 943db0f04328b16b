"""HSTU retrieval: next-item prediction the way generative-recommenders trains on MovieLens.

``item ids -> EmbeddingCollection -> HSTUTransducer (every token's output) -> dot product
with L2-normalized item embeddings``. Training uses a sampled softmax over the next item of
every position (:class:`HSTURetrievalTrain`); inference scores the full catalogue
(:meth:`HSTURetrieval.forward`).

Symbols: ``B`` sequences, ``L`` tokens, ``D`` embedding dim, ``N`` catalogue size, ``R``
sampled negatives.

Design for later export and sharding:

* ``forward`` takes plain tensors (ids, lengths, timestamps and an int ``max_seq_len``) and
  builds the ``KeyedJaggedTensor`` inside, so ``torch.export.export(strict=False)`` traces from
  ids to scores with no host sync.
* The ``EmbeddingCollection`` (``embedding_collection``) is the only sparse module; everything
  else is dense, so ``DistributedModelParallel`` can shard the table and data-parallelise the
  rest. Negatives are looked up through the same collection, never by indexing its weight.
* The table may live on another device than the dense part (:meth:`HSTURetrieval.place`):
  on a GPU machine without fbgemm CUDA ops the lookup runs on CPU and the HSTU part on CUDA.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.models.item_table import ItemTableModel
from torchrec_hstu.models.relative_bias import RelativeBiasSTULayer, relative_bias_timestamps
from torchrec_hstu.modules.hstu_transducer import HSTUTransducer
from torchrec_hstu.modules.positional_encoder import HSTUPositionalEncoder
from torchrec_hstu.modules.stu import STUStack
from torchrec_hstu.ops.common import HSTUKernel, is_tracing
from torchrec_hstu.ops.jagged import jagged_token_positions, lengths_to_offsets

#: Negative sampling strategies of :func:`sample_negatives`.
NEGATIVE_STRATEGIES = ("uniform", "in_batch", "mixed")


def example_stu_kwargs(
    embedding_dim: int,
    num_heads: int,
    hidden_dim: int,
    attention_dim: int,
    output_dropout_ratio: float,
    max_seq_len: int,
) -> Dict[str, object]:
    """STULayer kwargs shared by the example models: causal, target-aware,
    ``scaling_seqlen = max_seq_len`` (a user's output does not depend on the rest of the batch),
    no activation recompute (it trades compute for memory; on CPU-sized models compute is the
    bottleneck)."""
    return dict(
        embedding_dim=embedding_dim,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        attention_dim=attention_dim,
        output_dropout_ratio=output_dropout_ratio,
        causal=True,
        target_aware=True,
        scaling_seqlen=max_seq_len,
        recompute_normed_x=False,
        recompute_uvqk=False,
        recompute_y=False,
    )


def default_retrieval_transducer(
    embedding_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    attention_dim: int = 32,
    hidden_dim: int = 32,
    max_seq_len: int = 200,
    num_time_buckets: int = 128,
    use_time_encoding: bool = True,
    input_dropout_ratio: float = 0.2,
    output_dropout_ratio: float = 0.2,
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
    relative_attention_bias: bool = False,
    attn_alpha: Optional[float] = None,
    uvqk_activation: str = "u",
) -> HSTUTransducer:
    """The GR-style retrieval transducer from keyword arguments.

    Causal STU layers (``scaling_seqlen = max_seq_len`` so a user's output does not depend
    on the other sequences of the batch), the HSTU positional encoder (reversed positions,
    time gaps to the last interaction), L2-normalized outputs for every token.

    Args:
        embedding_dim: ``D``.
        num_layers: STU layers.
        num_heads: attention heads.
        attention_dim: q/k dim per head.
        hidden_dim: u/v dim per head.
        max_seq_len: longest sequence the model sees (position buckets, attention scaling).
        num_time_buckets: time-gap buckets of the positional encoder.
        use_time_encoding: add the time-gap embedding.
        input_dropout_ratio: dropout after positional encoding.
        output_dropout_ratio: dropout inside each STU layer.
        kernel: attention kernel (not used by the layers with ``relative_attention_bias``:
            they attend densely in PyTorch).
        relative_attention_bias: layers with the paper's relative position and time attention
            bias (:class:`~torchrec_hstu.models.relative_bias.RelativeBiasSTULayer`); the
            model must hand them each batch's timestamps (:class:`HSTURetrieval` does).
        attn_alpha: scale of ``q k^T`` (None: ``1/sqrt(attention_dim)``, GR's STU default).
        uvqk_activation: ``"u"`` (silu on u only, GR's STU default) or ``"all"`` (silu on u, v,
            q and k, as GR's research HSTU).

    Returns:
        :class:`HSTUTransducer` with ``return_full_embeddings=True``.
    """
    stu = example_stu_kwargs(
        embedding_dim, num_heads, hidden_dim, attention_dim, output_dropout_ratio, max_seq_len
    )
    if attn_alpha is not None:
        stu["attn_alpha"] = attn_alpha
    if uvqk_activation != "u":
        stu["uvqk_activation"] = uvqk_activation
    encoder = HSTUPositionalEncoder(
        num_position_buckets=max_seq_len + 1,
        num_time_buckets=num_time_buckets,
        embedding_dim=embedding_dim,
        use_time_encoding=use_time_encoding,
    )
    if relative_attention_bias:
        stack = STUStack([
            RelativeBiasSTULayer(max_seq_len=max_seq_len, kernel=kernel, **stu)  # type: ignore[arg-type]
            for _ in range(num_layers)
        ])
    else:
        stack = STUStack.uniform(stu, num_layers, kernel=kernel)
    return HSTUTransducer(
        stack,
        positional_encoder=encoder,
        input_dropout_ratio=input_dropout_ratio,
        return_full_embeddings=True,
    )


def gap_buckets(
    timestamps: torch.Tensor, offsets: torch.Tensor, num_buckets: int
) -> torch.Tensor:
    """Log2 bucket of the gap to the previous interaction of the same sequence.

    Bucket 0 marks a sequence's first token; a gap of ``g`` seconds gets
    ``1 + clamp(floor(log2(max(g, 1))), 0, num_buckets - 2)``.

    Args:
        timestamps: ``[L]`` seconds.
        offsets: ``[B + 1]``.
        num_buckets: number of buckets (>= 2).

    Returns:
        ``[L]`` int64 buckets.
    """
    total = timestamps.shape[0]
    _, positions = jagged_token_positions(offsets.to(torch.int64), total)
    previous = torch.cat([timestamps[:1], timestamps[:-1]])
    gap = torch.clamp((timestamps - previous).to(torch.float64), min=1.0)
    bucket = 1 + torch.clamp(torch.floor(torch.log2(gap)).to(torch.int64), min=0, max=num_buckets - 2)
    return torch.where(positions > 0, bucket, torch.zeros_like(bucket))


def next_item_positions(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Token indices ``[L']`` that have a successor in their own sequence (every token but the
    last of each sequence predicts the next one).

    Args:
        lengths: ``[B]``.
        total: ``L = sum(lengths)``.

    Returns:
        ``[L']`` int64 indices into the ``[L]`` tokens.
    """
    offsets = lengths_to_offsets(lengths)
    batch_ids, positions = jagged_token_positions(offsets, total)
    sequence_lengths = offsets[1:] - offsets[:-1]
    return torch.nonzero(positions < sequence_lengths[batch_ids] - 1).flatten()


def drop_item_tokens(embeddings: torch.Tensor, ratio: float, training: bool) -> torch.Tensor:
    """Item-embedding dropout: each token's whole item embedding is zeroed with probability
    ``ratio`` (the kept ones scaled by ``1 / (1 - ratio)``), so the model sometimes sees a
    position (and its time) without knowing which item was there. Elementwise dropout after
    the positional encoding (both models' input dropout) hides coordinates, not items.

    Args:
        embeddings: ``[L, D]`` item embeddings of the input tokens.
        ratio: drop probability in ``[0, 1)``; 0 (or ``training=False``) returns the input
            unchanged and draws no random numbers.
        training: apply only in training.

    Returns:
        ``[L, D]``.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"item dropout ratio must be in [0, 1); got {ratio}")
    if not training or ratio == 0.0 or embeddings.numel() == 0:
        return embeddings
    keep = torch.rand(embeddings.shape[0], 1, device=embeddings.device) >= ratio
    return embeddings * keep.to(embeddings.dtype) / (1.0 - ratio)


class SequentialRetrieval(ItemTableModel):
    """Shared item-table side of the sequential retrieval models (HSTU, SASRec).

    A subclass builds its sequence encoder, calls :meth:`init_item_table` and implements
    :meth:`encode`; this class provides the lookups through the ``EmbeddingCollection``, the
    L2-normalized catalogue, the user embedding at each sequence's last token and the
    full-catalogue scores. :class:`HSTURetrievalTrain` trains any subclass.
    """

    num_items: int
    embedding_dim: int
    feature_name: str
    table_name: str
    #: Item-embedding dropout of the input tokens (:func:`drop_item_tokens`; set with
    #: :meth:`set_item_dropout`). The catalogue side (targets, negatives, scoring) never drops.
    item_dropout_ratio: float = 0.0

    def set_item_dropout(self, ratio: float) -> None:
        """Set the item-embedding dropout of the input tokens (``[0, 1)``; 0: off)."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"item dropout ratio must be in [0, 1); got {ratio}")
        self.item_dropout_ratio = float(ratio)

    def init_item_table(
        self,
        num_items: int,
        embedding_dim: int,
        embedding_init_std: float,
        feature_name: str,
        table_name: str,
        device: Optional[torch.device],
    ) -> None:
        """Create the item ``EmbeddingCollection`` (``N`` rows, normal init).

        Args:
            num_items: catalogue size ``N`` (> 0).
            embedding_dim: ``D``.
            embedding_init_std: std of the normal init.
            feature_name: the id feature.
            table_name: the table (not ``items``: that collides with ``nn.ModuleDict.items``).
            device: device of the table.
        """
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.feature_name = feature_name
        self.create_item_table(num_items, embedding_dim, [feature_name], table_name, embedding_init_std, device)

    # -- lookups -------------------------------------------------------------------------
    def lookup(self, item_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Raw item embeddings through the ``EmbeddingCollection``.

        Args:
            item_ids: ``[L]`` int64.
            lengths: ``[B]`` (sums to ``L``).

        Returns:
            ``[L, D]`` on the dense device.
        """
        device = self.embedding_device()
        kjt = KeyedJaggedTensor(
            keys=[self.feature_name],
            values=item_ids.to(device),
            lengths=lengths.to(device=device, dtype=torch.int64),
        )
        return self.embedding_collection(kjt)[self.feature_name].values().to(self.dense_device())

    def lookup_with_extra(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, extra_ids: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(embeddings [L, D], extra [R, D] or None)``: ``extra_ids`` (e.g. sampled negatives)
        are looked up in the same collection call, as one more sequence appended to the batch.
        In training, ``embeddings`` (the input tokens, not ``extra``) go through the item
        dropout (:attr:`item_dropout_ratio`)."""
        if extra_ids is None:
            return drop_item_tokens(self.lookup(item_ids, lengths), self.item_dropout_ratio, self.training), None
        total = item_ids.shape[0]
        all_ids = torch.cat([item_ids, extra_ids.to(item_ids.device)])
        all_lengths = torch.cat(
            [lengths.to(torch.int64), torch.full((1,), extra_ids.shape[0], dtype=torch.int64, device=lengths.device)]
        )
        both = self.lookup(all_ids, all_lengths)
        return drop_item_tokens(both[:total], self.item_dropout_ratio, self.training), both[total:]

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        """``[R] -> [R, D]`` L2-normalized output embeddings of ``item_ids``."""
        lengths = torch.full((1,), item_ids.shape[0], dtype=torch.int64)
        return F.normalize(self.lookup(item_ids, lengths), dim=-1, eps=1e-6)

    def all_item_embeddings(self) -> torch.Tensor:
        """``[N, D]`` L2-normalized embeddings of the whole catalogue."""
        ids = torch.arange(self.num_items, device=self.embedding_device())
        return self.item_embeddings(ids)

    # -- encoding ------------------------------------------------------------------------
    def encode(
        self,
        item_ids: torch.Tensor,
        lengths: torch.Tensor,
        timestamps: torch.Tensor,
        max_seq_len: int,
        extra_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Every token's output plus the raw input embeddings.

        Args:
            item_ids: ``[L]`` int64 history ids, sequences back to back.
            lengths: ``[B]``.
            timestamps: ``[L]`` seconds.
            max_seq_len: ``max(lengths)`` (an int, passed to avoid a host sync).
            extra_ids: optional ``[R]`` ids to embed as well (same collection call).

        Returns:
            ``(outputs [L, D] L2-normalized, inputs [L, D] raw, extra [R, D] raw or None)``.
        """
        raise NotImplementedError

    def user_embeddings(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor, max_seq_len: int
    ) -> torch.Tensor:
        """``[B, D]``: the output at each sequence's last token (the next-item query).

        Every sequence must be non-empty (an empty one has no last token to score from).
        """
        if not is_tracing() and lengths.numel() > 0 and bool((lengths < 1).any()):
            raise ValueError(
                "lengths must be >= 1 for every sequence: an empty history has no last token to "
                f"build the user embedding from; got lengths={lengths.tolist()[:16]}"
            )
        outputs, _, _ = self.encode(item_ids, lengths, timestamps, max_seq_len)
        last = lengths_to_offsets(lengths.to(outputs.device))[1:] - 1
        return outputs[last]

    def forward(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor, max_seq_len: int
    ) -> torch.Tensor:
        """Scores of the next item over the whole catalogue.

        Args:
            item_ids: ``[L]`` int64.
            lengths: ``[B]`` (each >= 1).
            timestamps: ``[L]`` seconds.
            max_seq_len: ``max(lengths)``.

        Returns:
            ``[B, N]`` cosine scores.
        """
        users = self.user_embeddings(item_ids, lengths, timestamps, max_seq_len)
        return users @ self.all_item_embeddings().t()


class HSTURetrieval(SequentialRetrieval):
    """Generative retrieval model: HSTU over the item history, dot product with items.

    Args:
        num_items: catalogue size ``N`` (table rows).
        embedding_dim: ``D`` of the item table (must equal the transducer's).
        transducer: the sequence encoder (e.g. from ``default_retrieval_transducer`` or
            a ``.pbtxt`` config); it must return full embeddings. Default: built from
            ``transducer_kwargs``.
        num_gap_buckets: buckets of the gap-to-previous-interaction embedding added to the
            item embeddings (0: off).
        item_dropout_ratio: item-embedding dropout of the input tokens (:func:`drop_item_tokens`;
            0: off).
        embedding_init_std: std of the item table's normal init.
        feature_name: the id feature.
        table_name: the table (not ``items``: that collides with ``nn.ModuleDict.items``).
        device: device of the item table.
        **transducer_kwargs: arguments of :func:`default_retrieval_transducer`.

    Example::

        >>> model = HSTURetrieval(num_items=20, embedding_dim=16, num_layers=1, num_heads=1,
        ...                       attention_dim=8, hidden_dim=8, max_seq_len=8)
        >>> scores = model(torch.tensor([1, 2, 3]), torch.tensor([1, 2]),
        ...                torch.tensor([0, 60, 120]), max_seq_len=2)
        >>> scores.shape
        torch.Size([2, 20])
    """

    def __init__(
        self,
        num_items: int,
        embedding_dim: int = 64,
        transducer: Optional[HSTUTransducer] = None,
        num_gap_buckets: int = 32,
        embedding_init_std: float = 0.02,
        feature_name: str = "item_id",
        table_name: str = "item_table",
        device: Optional[torch.device] = None,
        item_dropout_ratio: float = 0.0,
        **transducer_kwargs,
    ) -> None:
        super().__init__()
        self.set_item_dropout(item_dropout_ratio)
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0; got {num_items}")
        if table_name == "items":
            raise ValueError("table_name must not be 'items' (collides with nn.ModuleDict.items)")
        if num_gap_buckets == 1 or num_gap_buckets < 0:
            raise ValueError(f"num_gap_buckets must be 0 (off) or >= 2; got {num_gap_buckets}")
        if transducer is None:
            transducer = default_retrieval_transducer(embedding_dim=embedding_dim, **transducer_kwargs)
        elif transducer_kwargs:
            raise ValueError(
                f"pass either a transducer or transducer kwargs, not both; got {sorted(transducer_kwargs)}"
            )
        if not transducer.return_full_embeddings:
            raise ValueError("the retrieval transducer must have return_full_embeddings=True")
        if transducer.embedding_dim != embedding_dim:
            raise ValueError(
                f"embedding_dim={embedding_dim} must equal the transducer's STU embedding_dim="
                f"{transducer.embedding_dim}: user outputs are scored by dot product with item embeddings"
            )
        self.num_gap_buckets = num_gap_buckets
        # The transducer is built (and initialised) before the table: the RNG order of the
        # published runs.
        self.init_item_table(num_items, embedding_dim, embedding_init_std, feature_name, table_name, device)
        self.gap_embeddings: Optional[nn.Embedding] = None
        if num_gap_buckets > 0:
            self.gap_embeddings = nn.Embedding(num_gap_buckets, embedding_dim)
            nn.init.normal_(self.gap_embeddings.weight, 0.0, embedding_init_std)
        self.transducer = transducer
        self.relative_bias_layers: List[RelativeBiasSTULayer] = [
            layer for layer in transducer.modules() if isinstance(layer, RelativeBiasSTULayer)
        ]

    def dense_device(self) -> torch.device:
        return next(self.transducer.parameters()).device

    def encode(
        self,
        item_ids: torch.Tensor,
        lengths: torch.Tensor,
        timestamps: torch.Tensor,
        max_seq_len: int,
        extra_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Every token's output plus the raw input embeddings (see
        :meth:`SequentialRetrieval.encode`): the gap embedding is added to the item embeddings,
        then the transducer runs over the jagged batch."""
        embeddings, extra = self.lookup_with_extra(item_ids, lengths, extra_ids)
        dense = self.dense_device()
        lengths = lengths.to(dense)
        timestamps = timestamps.to(dense)
        x = embeddings
        if self.gap_embeddings is not None:
            buckets = gap_buckets(timestamps, lengths_to_offsets(lengths), self.num_gap_buckets)
            x = x + self.gap_embeddings(buckets)
        with relative_bias_timestamps(self.relative_bias_layers, timestamps):
            out = self.transducer(
                JaggedTensor(values=x, lengths=lengths),
                seq_timestamps=timestamps,
                max_seq_len=max_seq_len,
            )
        assert out.full_embeddings is not None
        return out.full_embeddings.values(), embeddings, extra


def drop_last_tokens(
    item_ids: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each sequence into model inputs (all tokens but the last) and next-item targets
    (all tokens but the first); sequences shorter than two tokens are dropped.

    Args:
        item_ids: ``[L]`` int64 ids.
        lengths: ``[B]``.
        timestamps: ``[L]``.

    Returns:
        ``(input_ids [L'], input_lengths [B'], input_timestamps [L'], targets [L'])`` where
        ``targets[k]`` is the item that follows ``input_ids[k]`` in its sequence.
    """
    lengths = lengths.to(device=item_ids.device, dtype=torch.int64)
    offsets = lengths_to_offsets(lengths)
    batch_ids, positions = jagged_token_positions(offsets, item_ids.shape[0])
    kept = lengths >= 2
    in_kept = kept[batch_ids]
    is_input = in_kept & (positions < lengths[batch_ids] - 1)
    is_target = in_kept & (positions >= 1)
    return item_ids[is_input], lengths[kept] - 1, timestamps.to(item_ids.device)[is_input], item_ids[is_target]


class HSTURetrievalTrain(nn.Module):
    """Next-item softmax loss around a :class:`SequentialRetrieval` model (HSTU or SASRec;
    wrap this in DMP).

    For every token that has a successor in its sequence, the logits are
    ``<u_t, e(next)> / temperature`` and ``<u_t, e(neg_r)> / temperature`` for ``R`` shared
    negatives (``u`` and ``e`` L2-normalized); a negative equal to the positive is masked out
    (accidental hit). ``negative_log_q`` (the log expected count ``log(R q(j))`` of each
    negative under its sampling distribution ``q``, e.g. for in-batch negatives) is subtracted
    from the negative logits (logQ correction); uniform negatives need none. Without
    ``negative_ids`` the softmax runs over the full catalogue (every other item is a negative;
    feasible for small catalogues such as MovieLens').

    With ``shift_inputs`` the model reads each sequence without its last item and every
    position it reads is supervised (SASRec's and GR's input/target shift). Without it the model
    reads the whole sequence and its last position predicts nothing, so the position that
    evaluation scores from (the last one: reversed position 1 in HSTU, the last slot in SASRec)
    is never trained as a query.

    ``label_smoothing`` mixes the one-hot target with the uniform distribution over the
    catalogue (``torch.nn.functional.cross_entropy``'s ``label_smoothing``); full softmax only
    (a sampled softmax's masked accidental hits have ``-inf`` logits).

    A model with item-embedding dropout (:meth:`SequentialRetrieval.set_item_dropout`) needs
    ``shift_inputs`` or the full softmax: the unshifted sampled softmax takes its positives from
    the input embeddings, which the dropout zeroes.

    Args:
        model: the retrieval model.
        temperature: softmax temperature (GR: 0.05).
        shift_inputs: train on inputs without each sequence's last item (see above).
        label_smoothing: in ``[0, 1)``; 0: plain cross-entropy.

    Example::

        >>> model = HSTURetrieval(num_items=20, embedding_dim=16, num_layers=1, num_heads=1,
        ...                       attention_dim=8, hidden_dim=8, max_seq_len=8)
        >>> loss = HSTURetrievalTrain(model)(torch.tensor([1, 2, 3]), torch.tensor([1, 2]),
        ...     torch.tensor([0, 60, 120]), 2, torch.tensor([4, 5, 6]))
        >>> loss.dim()
        0
    """

    def __init__(
        self,
        model: SequentialRetrieval,
        temperature: float = 0.05,
        shift_inputs: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        self.model = model
        self.temperature = temperature
        self.shift_inputs = shift_inputs
        self.label_smoothing = label_smoothing

    def forward(
        self,
        item_ids: torch.Tensor,
        lengths: torch.Tensor,
        timestamps: torch.Tensor,
        max_seq_len: int,
        negative_ids: Optional[torch.Tensor],
        negative_log_q: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            item_ids: ``[L]`` int64 training sequences.
            lengths: ``[B]``.
            timestamps: ``[L]``.
            max_seq_len: ``max(lengths)``.
            negative_ids: ``[R]`` sampled negatives shared by all positions; None: full
                softmax over the ``N`` items of the catalogue.
            negative_log_q: optional ``[R]`` ``log(R q(j))`` of each negative.

        Returns:
            Scalar mean loss over supervised positions (0 if there are none).
        """
        if negative_ids is not None and self.label_smoothing > 0:
            raise ValueError("label_smoothing needs the full softmax (negative_ids=None); got sampled negatives")
        if self.shift_inputs:
            return self.shifted_loss(item_ids, lengths, timestamps, max_seq_len, negative_ids, negative_log_q)
        if negative_ids is None:
            return self.full_softmax(item_ids, lengths, timestamps, max_seq_len)
        if self.model.item_dropout_ratio > 0 and self.model.training:
            raise ValueError(
                "item dropout with sampled negatives needs shift_inputs=True: without it the positives "
                "are the (dropped) input embeddings"
            )
        outputs, inputs, negatives = self.model.encode(
            item_ids, lengths, timestamps, max_seq_len, extra_ids=negative_ids
        )
        assert negatives is not None
        device = outputs.device
        supervised = next_item_positions(lengths.to(device), outputs.shape[0])
        if supervised.numel() == 0:
            return outputs.sum() * 0.0
        queries = outputs[supervised]
        positives = F.normalize(inputs[supervised + 1], dim=-1, eps=1e-6)
        negatives = F.normalize(negatives, dim=-1, eps=1e-6)
        pos_logits = (queries * positives).sum(-1, keepdim=True) / self.temperature
        neg_logits = queries @ negatives.t() / self.temperature
        if negative_log_q is not None:
            neg_logits = neg_logits - negative_log_q.to(device).unsqueeze(0)
        targets = item_ids.to(device)[supervised + 1]
        hit = targets.unsqueeze(1) == negative_ids.to(device).unsqueeze(0)
        neg_logits = neg_logits.masked_fill(hit, float("-inf"))
        logits = torch.cat([pos_logits, neg_logits], dim=1)
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.int64, device=device))

    def shifted_loss(
        self,
        item_ids: torch.Tensor,
        lengths: torch.Tensor,
        timestamps: torch.Tensor,
        max_seq_len: int,
        negative_ids: Optional[torch.Tensor],
        negative_log_q: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """The loss with ``shift_inputs``: the model reads each sequence minus its last item and
        every position predicts the item after it (full or sampled softmax as in
        :meth:`forward`); targets and negatives go through the same collection call."""
        inputs, input_lengths, input_timestamps, targets = drop_last_tokens(item_ids, lengths, timestamps)
        if targets.numel() == 0:
            return next(self.model.parameters()).sum() * 0.0
        if negative_ids is None:
            extra_ids = torch.arange(self.model.num_items, dtype=torch.int64, device=item_ids.device)
        else:
            extra_ids = torch.cat([targets, negative_ids.to(targets.device)])
        outputs, _, extra = self.model.encode(
            inputs, input_lengths, input_timestamps, max(max_seq_len - 1, 1), extra_ids=extra_ids
        )
        assert extra is not None
        device = outputs.device
        targets = targets.to(device)
        if negative_ids is None:
            logits = outputs @ F.normalize(extra, dim=-1, eps=1e-6).t() / self.temperature
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        extra = F.normalize(extra.to(device), dim=-1, eps=1e-6)
        positives, negatives = extra[: targets.shape[0]], extra[targets.shape[0]:]
        pos_logits = (outputs * positives).sum(-1, keepdim=True) / self.temperature
        neg_logits = outputs @ negatives.t() / self.temperature
        if negative_log_q is not None:
            neg_logits = neg_logits - negative_log_q.to(device).unsqueeze(0)
        hit = targets.unsqueeze(1) == negative_ids.to(device).unsqueeze(0)
        neg_logits = neg_logits.masked_fill(hit, float("-inf"))
        logits = torch.cat([pos_logits, neg_logits], dim=1)
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.int64, device=device))

    def full_softmax(
        self, item_ids: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor, max_seq_len: int
    ) -> torch.Tensor:
        """Cross-entropy of the next item over the whole catalogue (``[L', N]`` logits).

        The catalogue is looked up in the same collection call as the batch, so gradients
        reach every item row.
        """
        catalogue = torch.arange(self.model.num_items, dtype=torch.int64, device=item_ids.device)
        outputs, _, items = self.model.encode(item_ids, lengths, timestamps, max_seq_len, extra_ids=catalogue)
        assert items is not None
        device = outputs.device
        supervised = next_item_positions(lengths.to(device), outputs.shape[0])
        if supervised.numel() == 0:
            return outputs.sum() * 0.0
        logits = outputs[supervised] @ F.normalize(items, dim=-1, eps=1e-6).t() / self.temperature
        return F.cross_entropy(logits, item_ids.to(device)[supervised + 1], label_smoothing=self.label_smoothing)


def sample_negatives(
    strategy: str,
    num_negatives: int,
    num_items: int,
    batch_item_ids: torch.Tensor,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Draw ``R`` shared negatives.

    Args:
        strategy: ``"uniform"`` (over the catalogue), ``"in_batch"`` (items of the batch,
            i.e. by popularity, with logQ correction) or ``"mixed"`` (half each).
        num_negatives: ``R``.
        num_items: ``N``.
        batch_item_ids: ``[L]`` ids of the batch.
        generator: RNG.

    Returns:
        ``(negative_ids [R], negative_log_q [R] or None)``: ``log(R q(j))`` for the logQ
        correction of :class:`HSTURetrievalTrain` (None for uniform draws: a constant).
    """
    if strategy not in NEGATIVE_STRATEGIES:
        raise ValueError(f"strategy must be one of {NEGATIVE_STRATEGIES}; got {strategy!r}")
    if num_negatives <= 0:
        raise ValueError(f"num_negatives must be > 0; got {num_negatives}")
    n_batch = {"uniform": 0, "in_batch": num_negatives, "mixed": num_negatives // 2}[strategy]
    if batch_item_ids.numel() == 0:
        n_batch = 0
    n_uniform = num_negatives - n_batch
    uniform = torch.randint(num_items, (n_uniform,), generator=generator)
    picks = torch.randint(max(batch_item_ids.numel(), 1), (n_batch,), generator=generator)
    in_batch = batch_item_ids.cpu()[picks] if n_batch > 0 else uniform[:0]
    ids = torch.cat([uniform, in_batch])
    if n_batch == 0:
        return ids, None
    # Mixture sampling probability of each drawn id: (n_u / N + n_b * freq_batch(id)) / R.
    counts = torch.bincount(batch_item_ids.cpu(), minlength=num_items).to(torch.float64)
    freq = counts[ids] / batch_item_ids.numel()
    q = (n_uniform / num_items + n_batch * freq) / num_negatives
    return ids, torch.log(q * num_negatives).to(torch.float32)

