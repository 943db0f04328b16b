"""DLRM-HSTU style multi-task ranking, with one or more history channels (MoT).

Each user's history (per channel) gets the ``C`` candidates appended (``num_targets``); the
STU layers are target-aware, so a candidate attends to the history and itself, never to
another candidate. Per channel an :class:`HSTUTransducer` (contextual preprocessor with the
action encoder, positional encoder, STU stack, LayerNorm postprocessor) returns one embedding
per candidate; channels are concatenated on the embedding dim (TorchEasyRec's Mixture of
Transducers). An item tower embeds the candidate ids, and a fusion head maps
``user_embedding * item_embedding`` to one logit per task (e.g. click and long view).

Symbols: ``B`` users, ``K`` channels, ``Lh`` history tokens over all channels, ``T``
candidates, ``D`` item embedding dim, ``d`` STU dim per channel.

Design for export and sharding as in :mod:`torchrec_hstu.models.retrieval`: ``forward`` takes
plain tensors and builds the ``KeyedJaggedTensor`` inside; the ``EmbeddingCollection`` is the
only sparse module (one table shared by every channel and the candidates).
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.models.item_table import ItemTableModel
from torchrec_hstu.models.retrieval import example_stu_kwargs
from torchrec_hstu.modules.hstu_transducer import HSTUTransducer
from torchrec_hstu.modules.multi_channel import MultiChannelHSTU
from torchrec_hstu.modules.positional_encoder import HSTUPositionalEncoder
from torchrec_hstu.modules.postprocessors import LayerNormPostprocessor
from torchrec_hstu.modules.preprocessors import ContextualPreprocessor, contextualized_mlp
from torchrec_hstu.modules.stu import STUStack
from torchrec_hstu.ops.common import HSTUKernel

DEFAULT_CANDIDATE_FEATURE = "candidates"


def default_ranking_transducer(
    input_embedding_dim: int,
    embedding_dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    attention_dim: int = 32,
    hidden_dim: int = 32,
    max_seq_len: int = 256,
    num_time_buckets: int = 128,
    preprocessor_hidden_dim: int = 128,
    action_embedding_dim: int = 8,
    action_weights: Sequence[int] = (1, 2),
    input_dropout_ratio: float = 0.2,
    output_dropout_ratio: float = 0.2,
    kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
) -> HSTUTransducer:
    """A DLRM-HSTU channel transducer from keyword arguments.

    Args:
        input_embedding_dim: ``D`` of the item table.
        embedding_dim: STU dim ``d``.
        num_layers: STU layers.
        num_heads: heads.
        attention_dim: q/k dim per head.
        hidden_dim: u/v dim per head.
        max_seq_len: longest history + candidates (position buckets, attention scaling).
        num_time_buckets: time buckets of the positional encoder.
        preprocessor_hidden_dim: hidden width of the content and action MLPs.
        action_embedding_dim: width per action type of the action encoder.
        action_weights: the bit of each action type (click 1, long view 2).
        input_dropout_ratio: dropout after positional encoding.
        output_dropout_ratio: dropout inside each STU layer.
        kernel: attention kernel.

    Returns:
        :class:`HSTUTransducer` returning candidate embeddings (LayerNorm-ed).
    """
    preprocessor = ContextualPreprocessor(
        input_embedding_dim=input_embedding_dim,
        output_embedding_dim=embedding_dim,
        hidden_dim=preprocessor_hidden_dim,
        action_embedding_dim=action_embedding_dim,
        action_weights=list(action_weights),
    )
    stu = example_stu_kwargs(
        embedding_dim, num_heads, hidden_dim, attention_dim, output_dropout_ratio, max_seq_len
    )
    encoder = HSTUPositionalEncoder(
        num_position_buckets=max_seq_len + 1,
        num_time_buckets=num_time_buckets,
        embedding_dim=embedding_dim,
    )
    return HSTUTransducer(
        STUStack.uniform(stu, num_layers, preprocessor.contextual_seq_len(), kernel=kernel),
        input_preprocessor=preprocessor,
        positional_encoder=encoder,
        output_postprocessor=LayerNormPostprocessor(embedding_dim),
        input_dropout_ratio=input_dropout_ratio,
        return_full_embeddings=False,
    )


def default_multi_channel(
    channels: Sequence[str],
    item_embedding_dim: int,
    max_seq_len: int = 256,
    candidate_feature_name: str = DEFAULT_CANDIDATE_FEATURE,
    **transducer_kwargs,
) -> MultiChannelHSTU:
    """One :func:`default_ranking_transducer` per channel in a :class:`MultiChannelHSTU`."""
    return MultiChannelHSTU(
        [
            (name, default_ranking_transducer(item_embedding_dim, max_seq_len=max_seq_len, **transducer_kwargs))
            for name in channels
        ],
        candidate_feature_name=candidate_feature_name,
        max_seq_len=max_seq_len,
    )


class HSTURanking(ItemTableModel):
    """Multi-task ranking of candidates appended to one or more history channels.

    Args:
        num_items: item table rows.
        item_embedding_dim: ``D``.
        encoder: the :class:`MultiChannelHSTU` (e.g. ``build_multi_channel`` of a ``.pbtxt``);
            default: :func:`default_multi_channel` over ``channels`` from ``transducer_kwargs``.
        channels: history channel names when ``encoder`` is None.
        task_names: one logit per task.
        item_mlp_hidden_dim: hidden width of the candidate item tower.
        fusion_hidden_dim: hidden width of the fusion head.
        embedding_init_std: std of the item table's normal init.
        table_name: the item table shared by every channel and the candidates (not ``items``).
        device: device of the item table.
        **transducer_kwargs: arguments of :func:`default_multi_channel` /
            :func:`default_ranking_transducer`.

    Example::

        >>> model = HSTURanking(num_items=30, item_embedding_dim=8, channels=("clicks", "views"),
        ...     embedding_dim=16, num_layers=1, num_heads=1, attention_dim=8, hidden_dim=8,
        ...     max_seq_len=8)
        >>> logits = model(history_ids=torch.tensor([1, 2, 3, 4]),
        ...     history_lengths=torch.tensor([2, 1, 1, 0]), history_timestamps=torch.arange(4),
        ...     history_actions=torch.tensor([1, 0, 1, 1]), candidate_ids=torch.tensor([5, 6, 7]),
        ...     num_targets=torch.tensor([2, 1]), candidate_timestamps=torch.tensor([9, 9, 9]))
        >>> logits.shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        num_items: int,
        item_embedding_dim: int = 64,
        encoder: Optional[MultiChannelHSTU] = None,
        channels: Sequence[str] = ("uih",),
        task_names: Sequence[str] = ("click", "long_view"),
        item_mlp_hidden_dim: int = 128,
        fusion_hidden_dim: int = 128,
        embedding_init_std: float = 0.02,
        table_name: str = "item_table",
        device: Optional[torch.device] = None,
        **transducer_kwargs,
    ) -> None:
        super().__init__()
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0; got {num_items}")
        if not task_names:
            raise ValueError("task_names must not be empty")
        if encoder is None:
            encoder = default_multi_channel(list(channels), item_embedding_dim, **transducer_kwargs)
        elif transducer_kwargs:
            raise ValueError(
                f"pass either an encoder or transducer kwargs, not both; got {sorted(transducer_kwargs)}"
            )
        for name in encoder.channel_names:
            if encoder.channel(name).return_full_embeddings:
                raise ValueError(f"channel {name!r}: ranking transducers return candidate embeddings only")
        self.num_items = num_items
        self.item_embedding_dim = item_embedding_dim
        self.channels: List[str] = list(encoder.channel_names)
        self.candidate_feature_name = encoder.candidate_feature_name
        self.task_names = list(task_names)
        self.create_item_table(
            num_items, item_embedding_dim, self.channels + [self.candidate_feature_name], table_name,
            embedding_init_std, device,
        )
        self.encoder = encoder
        user_dim = encoder.output_dim
        self.item_mlp = contextualized_mlp(item_embedding_dim, item_mlp_hidden_dim, user_dim)
        self.fusion = nn.Sequential(
            nn.Linear(user_dim, fusion_hidden_dim),
            nn.SiLU(),
            nn.Linear(fusion_hidden_dim, len(self.task_names)),
        )

    def forward(
        self,
        history_ids: torch.Tensor,
        history_lengths: torch.Tensor,
        history_timestamps: torch.Tensor,
        history_actions: torch.Tensor,
        candidate_ids: torch.Tensor,
        num_targets: torch.Tensor,
        candidate_timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of every task for every candidate.

        ``max_seq_len`` is not an argument: the encoder reads it from the lengths in eager mode
        and uses its configured bound (``MultiChannelHSTU.max_seq_len``) when tracing.

        Args:
            history_ids: ``[Lh]`` int64, channel-major (all users of channel 0, then 1, ...),
                the ``KeyedJaggedTensor`` order of ``self.channels``.
            history_lengths: ``[K * B]`` int64.
            history_timestamps: ``[Lh]`` seconds.
            history_actions: ``[Lh]`` int64 action bitmasks.
            candidate_ids: ``[T]`` int64.
            num_targets: ``[B]`` candidates per user (``sum = T``).
            candidate_timestamps: ``[T]`` seconds (request time).

        Returns:
            ``[T, num_tasks]`` logits.
        """
        num_channels = len(self.channels)
        batch_size = num_targets.shape[0]
        if history_lengths.shape != (num_channels * batch_size,):
            raise ValueError(
                f"history_lengths must be [K * B]=[{num_channels * batch_size}] "
                f"({num_channels} channels, B={batch_size}); got {tuple(history_lengths.shape)}"
            )
        device = self.embedding_device()
        kjt = KeyedJaggedTensor(
            keys=self.channels + [self.candidate_feature_name],
            values=torch.cat([history_ids, candidate_ids]).to(device),
            lengths=torch.cat([history_lengths, num_targets]).to(device=device, dtype=torch.int64),
        )
        embedded = self.embedding_collection(kjt)
        dense = self.dense_device()
        seq_embeddings: Dict[str, JaggedTensor] = {}
        for key, jt in embedded.items():
            seq_embeddings[key] = JaggedTensor(values=jt.values().to(dense), lengths=jt.lengths().to(dense))
        sizes = [seq_embeddings[c].values().shape[0] for c in self.channels]
        timestamps = dict(zip(self.channels, torch.split(history_timestamps.to(dense), sizes)))
        # Under torch.export the lookup's per-key sizes are unbacked: tie the candidates' to T.
        torch._check(seq_embeddings[self.candidate_feature_name].values().shape[0] == candidate_timestamps.shape[0])
        timestamps[self.candidate_feature_name] = candidate_timestamps.to(dense)
        actions = dict(zip(self.channels, torch.split(history_actions.to(dense), sizes)))
        user = self.encoder(seq_embeddings, seq_timestamps=timestamps, seq_actions=actions).candidate_embeddings
        item = self.item_mlp(seq_embeddings[self.candidate_feature_name].values())
        return self.fusion(user.values() * item)


class HSTURankingTrain(nn.Module):
    """Mean binary cross-entropy over tasks around :class:`HSTURanking` (wrap this in DMP).

    Args:
        model: the ranking model.
        task_weights: per-task loss weights (default 1 each).
    """

    task_weights: torch.Tensor  # buffer registered in __init__

    def __init__(self, model: HSTURanking, task_weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        weights = [1.0] * len(model.task_names) if task_weights is None else list(task_weights)
        if len(weights) != len(model.task_names):
            raise ValueError(f"task_weights must have {len(model.task_names)} entries; got {len(weights)}")
        self.model = model
        self.register_buffer("task_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, labels: torch.Tensor, **inputs) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            labels: ``[T, num_tasks]`` 0/1 floats.
            **inputs: the arguments of :meth:`HSTURanking.forward`.

        Returns:
            ``(loss scalar, logits [T, num_tasks])``.
        """
        logits = self.model(**inputs)
        labels = labels.to(logits.device, logits.dtype)
        per_task = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
        weights = self.task_weights.to(logits.device)
        return (per_task * weights).sum() / weights.sum(), logits
