"""Multi-channel HSTU (ULTRA-HSTU's Mixture of Transducers): one transducer per sequence feature.

Each channel is an :class:`HSTUTransducer` over its own history (its own KJT key, e.g. clicks
or long views) followed by the candidates, which all channels share. Every channel encodes
``[its history | the candidates]`` with its own STU settings (layers, SLA, truncation,
``fp8_quant_mode``), and the per-candidate outputs are concatenated on the embedding dim.

Input contract (what :meth:`MultiChannelHSTU.forward` reads), with ``B`` requests:

* ``seq_embeddings``: the ``Dict[str, JaggedTensor]`` an ``EmbeddingCollection`` returns. For
  each channel the key ``channel_name`` (``"uih"`` for a single unnamed channel) holds its
  history ``[L_c, D]`` with ``B`` lengths (oldest first); the key ``candidate_feature_name``
  holds the candidates ``[T, D]`` with ``B`` lengths ``num_candidates``. Channels may share an
  embedding table (several features of one ``EmbeddingConfig``) or not; only the widths must
  match: history and candidates of a channel are concatenated per request.
* ``seq_timestamps`` (when a channel uses time encoding or the timestamp postprocessor): the
  same keys, values ``[L_c]`` / ``[T]`` (seconds; a candidate's timestamp is the request time).
* ``seq_actions`` (when a channel has an action encoder): the channel keys, ``[L_c]`` int
  bitmasks; candidates never expose actions (they get the encoder's target embedding).
* ``contextual_embeddings``: ``[B, C, F]``, shared by the channels that prepend contextual tokens.

Host syncs: the lengths of every channel and of the candidates are read and checked in one
transfer at the model's edge (:meth:`MultiChannelHSTU.check_batch_sync`); each channel's
transducer gets its facts as ints and reads nothing from the device.
"""

import dataclasses
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.modules.hstu_transducer import HSTUTransducer
from torchrec_hstu.modules.jagged_types import jagged_tensor, jagged_values, jagged_values_lengths
from torchrec_hstu.ops.common import JaggedBatchFacts, check_jagged_batch_sync, is_tracing
from torchrec_hstu.ops.jagged import concat_2D_jagged, lengths_to_offsets

logger = logging.getLogger(__name__)

#: Embeddings-dict key of a single channel whose name is empty.
DEFAULT_CHANNEL_NAME = "uih"

JaggedOrTensor = Union[JaggedTensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class MultiChannelBatchFacts:
    """Host facts of a multi-channel batch, read once by :meth:`MultiChannelHSTU.check_batch_sync`.

    Attributes:
        channels: per channel name, the facts of its ``[history | candidates]`` sequences
            (``num_targets`` = the candidate counts, ``max_seq_len`` = the channel's longest,
            at least 1, before its contextual prefix).
    """

    channels: Dict[str, JaggedBatchFacts]


@dataclasses.dataclass
class MultiChannelHSTUOutput:
    """Outputs of :class:`MultiChannelHSTU`.

    Attributes:
        candidate_embeddings: ``[T, sum_c d_c]`` with the candidates' ``B`` lengths: every
            channel's candidate output, concatenated in channel order.
        channel_embeddings: per channel name, its ``[T, d_c]`` candidate output.
    """

    candidate_embeddings: JaggedTensor
    channel_embeddings: Dict[str, JaggedTensor]


class MultiChannelHSTU(nn.Module):
    """N transducers over N histories and one shared set of candidates.

    Args:
        channels: ``(name, transducer)`` pairs in output order. Names are the keys of the
            channels' histories in the embeddings dict; with two or more channels they must be
            unique and non-empty; a single channel may be unnamed (key ``"uih"``).
        candidate_feature_name: key of the candidate embeddings (and timestamps).
        max_seq_len: longest ``contextual + history + candidates`` sequence a channel accepts
            (0: no bound); checked in eager mode, a runtime assertion of an exported program
            (which, like eager, uses each channel's exact batch maximum).

    Example::

        >>> from torchrec_hstu.modules import HSTUTransducer, STULayer, STUStack
        >>> def channel():
        ...     return HSTUTransducer(STUStack([STULayer(8, 2, 4, 4, output_dropout_ratio=0.0)]))
        >>> mot = MultiChannelHSTU([("clicks", channel()), ("views", channel())])
        >>> emb = {
        ...     "clicks": JaggedTensor(values=torch.randn(3, 8), lengths=torch.tensor([1, 2])),
        ...     "views": JaggedTensor(values=torch.randn(4, 8), lengths=torch.tensor([4, 0])),
        ...     "candidates": JaggedTensor(values=torch.randn(3, 8), lengths=torch.tensor([2, 1])),
        ... }
        >>> mot(emb).candidate_embeddings.values().shape
        torch.Size([3, 16])
    """

    def __init__(
        self,
        channels: Sequence[Tuple[str, HSTUTransducer]],
        candidate_feature_name: str = "candidates",
        max_seq_len: int = 0,
    ) -> None:
        super().__init__()
        channels = list(channels)
        if len(channels) == 0:
            raise ValueError("channels must hold at least one (name, HSTUTransducer) pair; got none")
        names = [name for name, _ in channels]
        for index, (name, transducer) in enumerate(channels):
            if not isinstance(name, str):
                raise ValueError(f"channels[{index}] name must be a str; got {name!r}")
            if not isinstance(transducer, HSTUTransducer):
                raise ValueError(
                    f"channels[{index}] ({name!r}) must be an HSTUTransducer; got {type(transducer).__name__}"
                )
        if len(channels) >= 2:
            for index, name in enumerate(names):
                if not name:
                    raise ValueError(
                        f"channel names must be non-empty with {len(channels)} channels; "
                        f"channels[{index}] has name {name!r}"
                    )
                if names.index(name) != index:
                    raise ValueError(
                        f"channel names must be unique; channels[{index}] repeats {name!r} (names: {names})"
                    )
        names = [name or DEFAULT_CHANNEL_NAME for name in names]
        if candidate_feature_name in names:
            raise ValueError(
                f"candidate_feature_name {candidate_feature_name!r} must differ from the channel names {names}"
            )
        if max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0 (0: no bound); got {max_seq_len}")
        self.channel_names: List[str] = names
        self.channels = nn.ModuleList([transducer for _, transducer in channels])
        self.candidate_feature_name = candidate_feature_name
        self.max_seq_len = max_seq_len

    @property
    def output_dim(self) -> int:
        """Width of the concatenated candidate embeddings (sum of the channels' dims)."""
        return sum(channel.embedding_dim for channel in cast(Iterable[HSTUTransducer], self.channels))

    def channel(self, name: str) -> HSTUTransducer:
        """The transducer of channel ``name``."""
        if name not in self.channel_names:
            raise ValueError(f"no channel named {name!r}; channels: {self.channel_names}")
        return cast(HSTUTransducer, self.channels[self.channel_names.index(name)])

    def _get(self, inputs: Dict[str, JaggedOrTensor], key: str, argument: str, channel: str) -> JaggedOrTensor:
        if key not in inputs:
            raise ValueError(
                f"{argument} has no key {key!r} (needed by channel {channel!r}); keys: {sorted(inputs)}"
            )
        return inputs[key]

    def _history(
        self, seq_embeddings: Dict[str, JaggedTensor], name: str, num_candidates: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(values, lengths)`` of channel ``name``'s history; ``B`` lengths like the candidates'."""
        hist_values, hist_lengths = jagged_values_lengths(self._get(seq_embeddings, name, "seq_embeddings", name))
        if hist_lengths.shape != num_candidates.shape:
            raise ValueError(
                f"seq_embeddings[{name!r}] has {hist_lengths.numel()} sequences but "
                f"seq_embeddings[{self.candidate_feature_name!r}] has {num_candidates.numel()}; both must have B lengths"
            )
        return hist_values, hist_lengths

    def check_batch_sync(self, seq_embeddings: Dict[str, JaggedTensor]) -> Optional[MultiChannelBatchFacts]:
        """The edge check of :meth:`forward`'s inputs: every channel's and the candidates'
        lengths in one host read. None while tracing.

        Checks each key's lengths against its values (non-negative, summing to the number of
        rows) and each channel's longest ``contextual + history + candidates`` against
        ``max_seq_len`` (when set). Pass the result to ``forward(..., batch_facts=facts)`` and
        nothing is read from the device there.
        """
        cand_key = self.candidate_feature_name
        cand_values, num_candidates = jagged_values_lengths(self._get(seq_embeddings, cand_key, "seq_embeddings", "all"))
        parts = [num_candidates]
        totals = [cand_values.shape[0]]
        for name in self.channel_names:
            hist_values, hist_lengths = self._history(seq_embeddings, name, num_candidates)
            parts.append(hist_lengths.to(num_candidates.device))
            totals.append(hist_values.shape[0])
        if is_tracing():
            return None
        # One jagged batch of (channels + 1) * B sequences: the candidates', then each history's.
        all_lengths = torch.cat([p.to(torch.int64) for p in parts])
        facts = check_jagged_batch_sync(
            lengths_to_offsets(all_lengths), sum(totals), name=f"the lengths of seq_embeddings {[cand_key] + self.channel_names}"
        )
        if facts is None:
            return None
        batch_size = num_candidates.numel()
        chunks = [facts.lengths[i * batch_size:(i + 1) * batch_size] for i in range(len(parts))]
        for key, chunk, total in zip([cand_key] + self.channel_names, chunks, totals):
            if sum(chunk) != total:
                raise ValueError(
                    f"seq_embeddings[{key!r}] has {total} rows but its lengths sum to {sum(chunk)}"
                )
        candidates = chunks[0]
        channels: Dict[str, JaggedBatchFacts] = {}
        for name, transducer, history in zip(self.channel_names, cast(Iterable[HSTUTransducer], self.channels), chunks[1:]):
            lengths = tuple(h + t for h, t in zip(history, candidates))
            longest = max(lengths, default=0)
            prefix = transducer.contextual_seq_len
            if self.max_seq_len > 0 and longest + prefix > self.max_seq_len:
                raise ValueError(
                    f"channel {name!r}: a sequence has {longest + prefix} tokens (contextual {prefix} + "
                    f"history + candidates), more than max_seq_len={self.max_seq_len}; truncate histories "
                    "to fit or raise max_seq_len"
                )
            channels[name] = JaggedBatchFacts(lengths=lengths, num_targets=candidates, max_seq_len=max(longest, 1))
        return MultiChannelBatchFacts(channels=channels)

    def forward(
        self,
        seq_embeddings: Dict[str, JaggedTensor],
        seq_timestamps: Optional[Dict[str, JaggedOrTensor]] = None,
        seq_actions: Optional[Dict[str, JaggedOrTensor]] = None,
        contextual_embeddings: Optional[torch.Tensor] = None,
        batch_facts: Optional[MultiChannelBatchFacts] = None,
    ) -> MultiChannelHSTUOutput:
        """
        Args:
            seq_embeddings: per channel name its history ``[L_c, D]`` JaggedTensor, and under
                ``candidate_feature_name`` the candidates ``[T, D]`` (``B`` lengths each).
            seq_timestamps: optional, same keys: ``[L_c]`` / ``[T]`` timestamps (tensor or
                JaggedTensor); a channel uses them only if both its key and the candidates'
                are present.
            seq_actions: optional, channel keys: ``[L_c]`` int action bitmasks.
            contextual_embeddings: optional ``[B, C, F]`` for channels with contextual tokens.
            batch_facts: :meth:`check_batch_sync` of these inputs (None: checked here, one
                host read).

        Returns:
            :class:`MultiChannelHSTUOutput`, candidate embeddings ``[T, sum_c d_c]``.
        """
        if batch_facts is None:
            batch_facts = self.check_batch_sync(seq_embeddings)
        cand_key = self.candidate_feature_name
        candidates = self._get(seq_embeddings, cand_key, "seq_embeddings", "all")
        cand_values, num_candidates = jagged_values_lengths(candidates)
        cand_offsets = lengths_to_offsets(num_candidates)
        cand_timestamps = None
        if seq_timestamps is not None and cand_key in seq_timestamps:
            cand_timestamps = jagged_values(seq_timestamps[cand_key])
        outputs: Dict[str, JaggedTensor] = {}
        for name, transducer in zip(self.channel_names, cast(Iterable[HSTUTransducer], self.channels)):
            hist_values, hist_lengths = self._history(seq_embeddings, name, num_candidates)
            hist_offsets = lengths_to_offsets(hist_lengths)
            values = concat_2D_jagged(hist_values, cand_values, hist_offsets, cand_offsets)
            lengths = hist_lengths.to(torch.int64) + num_candidates.to(torch.int64)
            timestamps = None
            if seq_timestamps is not None and name in seq_timestamps:
                if cand_timestamps is None:
                    raise ValueError(
                        f"seq_timestamps has channel {name!r} but not the candidates' key {cand_key!r}"
                    )
                timestamps = concat_2D_jagged(
                    jagged_values(seq_timestamps[name]), cand_timestamps, hist_offsets, cand_offsets
                )
            actions = None
            if seq_actions is not None and name in seq_actions:
                hist_actions = jagged_values(seq_actions[name])
                actions = concat_2D_jagged(
                    hist_actions,
                    hist_actions.new_zeros(cand_values.shape[0]),
                    hist_offsets,
                    cand_offsets,
                )
            facts = None if batch_facts is None else batch_facts.channels[name]
            out = transducer(
                jagged_tensor(values, lengths_to_offsets(lengths)),
                seq_timestamps=timestamps,
                num_targets=num_candidates,
                contextual_embeddings=contextual_embeddings,
                seq_actions=actions,
                max_seq_len=self._traced_max_seq_len(transducer, lengths) if facts is None else facts.max_seq_len,
                batch_facts=facts,
            )
            outputs[name] = out.candidate_embeddings
        merged = torch.cat([outputs[name].values() for name in self.channel_names], dim=-1)
        return MultiChannelHSTUOutput(
            candidate_embeddings=jagged_tensor(merged, cand_offsets),
            channel_embeddings=outputs,
        )

    def _traced_max_seq_len(self, transducer: HSTUTransducer, lengths: torch.Tensor) -> int:
        """Under tracing: the channel's exact batch maximum as an unbacked size, so an exported
        model pads and scales (``scaling_seqlen=-1``) as eager does; the bound becomes a runtime
        assertion."""
        longest_traced = cast(int, torch.cat([lengths, lengths.new_ones(1)]).max().item())
        torch._check(longest_traced >= 1)
        if self.max_seq_len > 0:
            torch._check(longest_traced + transducer.contextual_seq_len <= self.max_seq_len)
        return longest_traced
