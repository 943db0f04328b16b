"""HSTUTransducer: preprocessor -> positional encoder -> STU stack -> postprocessor, on torchrec types."""

import dataclasses
import logging
from typing import Iterable, Optional, Union, cast

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.modules.jagged_types import (  # noqa: F401  (jagged_* re-exported for old imports)
    JaggedInput,
    jagged_tensor,
    jagged_values,
    jagged_values_lengths,
    select_jagged,
)
from torchrec_hstu.modules.kv_cache import (
    HSTUKVCache,
    batch_key_flag,
    check_batch_key,
    check_prefix_offsets,
    delta_step_stats_sync,
    prefix_offsets_flag,
)
from torchrec_hstu.modules.positional_encoder import HSTUPositionalEncoder
from torchrec_hstu.modules.postprocessors import L2NormPostprocessor, OutputPostprocessor
from torchrec_hstu.modules.preprocessors import ContextualPreprocessor, PreprocessorOutput
from torchrec_hstu.modules.stu import STULayer, STUStack
from torchrec_hstu.ops.common import HSTUKernel, JaggedBatchFacts, check_jagged_batch_sync, is_tracing, to_kernel
from torchrec_hstu.ops.jagged import concat_2D_jagged, lengths_to_offsets, split_2D_jagged

logger = logging.getLogger(__name__)


def with_prefix(facts: Optional[JaggedBatchFacts], prefix_len: int, max_seq_len: int) -> Optional[JaggedBatchFacts]:
    """The facts after ``prefix_len`` contextual tokens are prepended to every sequence (None
    stays None: tracing); ``max_seq_len`` is the new bound (the caller's plus the prefix)."""
    if facts is None:
        return None
    lengths = tuple(n + prefix_len for n in facts.lengths) if prefix_len else facts.lengths
    return JaggedBatchFacts(lengths=lengths, num_targets=facts.num_targets, max_seq_len=max_seq_len)


@dataclasses.dataclass
class HSTUTransducerOutput:
    """Outputs of :class:`HSTUTransducer`.

    Attributes:
        candidate_embeddings: the last ``num_targets[b]`` tokens of each sequence,
            post-processed (zero tokens per sequence when ``num_targets`` is None).
        full_embeddings: every non-contextual token after the STU stack (post-processed), when
            ``return_full_embeddings``; after truncation, the dropped history tokens are absent.
        full_timestamps: timestamps of ``full_embeddings`` (when given and returned).
    """

    candidate_embeddings: JaggedTensor
    full_embeddings: Optional[JaggedTensor] = None
    full_timestamps: Optional[torch.Tensor] = None


class HSTUTransducer(nn.Module):
    """Encode user sequences with HSTU; drop it in after an ``EmbeddingCollection``.

    Each sequence is ``[history | targets]`` item embeddings (``num_targets[b]`` trailing
    candidates); the preprocessor may prepend contextual tokens. Outputs are JaggedTensors.

    Args:
        stu_module: the :class:`STUStack`.
        input_preprocessor: optional :class:`ContextualPreprocessor` (None: inputs must already
            have the stack's ``embedding_dim``).
        positional_encoder: optional :class:`HSTUPositionalEncoder`.
        output_postprocessor: applied to the outputs (default :class:`L2NormPostprocessor`).
        input_dropout_ratio: dropout after positional encoding.
        return_full_embeddings: also return every token's output.
        feature_name: key to read when the input is an ``EmbeddingCollection`` output dict.

    Example::

        >>> from torchrec_hstu.modules import STULayer, STUStack
        >>> stack = STUStack([STULayer(16, 2, 8, 8, output_dropout_ratio=0.0)])
        >>> transducer = HSTUTransducer(stack, return_full_embeddings=True)
        >>> jt = JaggedTensor(values=torch.randn(5, 16), lengths=torch.tensor([2, 3]))
        >>> out = transducer(jt, num_targets=torch.tensor([1, 1]))
        >>> out.candidate_embeddings.values().shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        stu_module: STUStack,
        input_preprocessor: Optional[ContextualPreprocessor] = None,
        positional_encoder: Optional[HSTUPositionalEncoder] = None,
        output_postprocessor: Optional[OutputPostprocessor] = None,
        input_dropout_ratio: float = 0.0,
        return_full_embeddings: bool = False,
        feature_name: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= input_dropout_ratio < 1.0:
            raise ValueError(f"input_dropout_ratio must be in [0, 1); got {input_dropout_ratio}")
        self.stu_module = stu_module
        self.input_preprocessor = input_preprocessor
        self.positional_encoder = positional_encoder
        self.output_postprocessor = output_postprocessor if output_postprocessor is not None else L2NormPostprocessor()
        self.input_dropout = nn.Dropout(input_dropout_ratio)
        self.return_full_embeddings = return_full_embeddings
        self.feature_name = feature_name
        first = cast(STULayer, stu_module.layers[0])
        self.embedding_dim = first.config.embedding_dim
        self.contextual_seq_len = (
            input_preprocessor.contextual_seq_len() if input_preprocessor is not None else 0
        )
        if input_preprocessor is not None and input_preprocessor.output_embedding_dim != self.embedding_dim:
            raise ValueError(
                f"input_preprocessor.output_embedding_dim={input_preprocessor.output_embedding_dim} "
                f"must equal the STU embedding_dim={self.embedding_dim}"
            )
        if positional_encoder is not None:
            if positional_encoder.embedding_dim != self.embedding_dim:
                raise ValueError(
                    f"positional_encoder.embedding_dim={positional_encoder.embedding_dim} must equal "
                    f"the STU embedding_dim={self.embedding_dim}"
                )
            if positional_encoder.contextual_seq_len != self.contextual_seq_len:
                raise ValueError(
                    f"positional_encoder.contextual_seq_len={positional_encoder.contextual_seq_len} "
                    f"differs from the preprocessor's contextual prefix {self.contextual_seq_len}"
                )
        for layer in cast(Iterable[STULayer], stu_module.layers):
            if layer.attention_options.contextual_seq_len != self.contextual_seq_len:
                raise ValueError(
                    f"STU contextual_seq_len={layer.attention_options.contextual_seq_len} differs from the "
                    f"preprocessor's contextual prefix {self.contextual_seq_len}; build layers with "
                    "contextual_seq_len=-1 through torchrec_hstu.config.build_transducer (or STUStack.uniform) or set it equal"
                )

    def set_kernel(self, kernel: Union[HSTUKernel, str]) -> None:
        """Set the attention kernel of every STU layer."""
        kernel = to_kernel(kernel)
        for layer in cast(Iterable[STULayer], self.stu_module.layers):
            layer.kernel = kernel

    def check_batch_sync(
        self,
        seq_embeddings: JaggedInput,
        num_targets: Optional[torch.Tensor] = None,
        max_seq_len: Optional[int] = None,
    ) -> Optional[JaggedBatchFacts]:
        """The edge check of :meth:`forward`'s inputs, on its own: one host read.

        Pass the result to ``forward(..., batch_facts=facts)`` (with the same inputs) and the
        forward and backward read nothing from the device. None while tracing.

        Example::

            >>> from torchrec_hstu.modules import STULayer, STUStack
            >>> transducer = HSTUTransducer(STUStack([STULayer(16, 2, 8, 8)]))
            >>> jt = JaggedTensor(values=torch.randn(5, 16), lengths=torch.tensor([2, 3]))
            >>> facts = transducer.check_batch_sync(jt, num_targets=torch.tensor([1, 1]))
            >>> facts.max_seq_len, facts.total_targets
            (3, 2)
        """
        values, lengths = jagged_values_lengths(select_jagged(seq_embeddings, self.feature_name))
        return check_jagged_batch_sync(lengths_to_offsets(lengths), values.shape[0], max_seq_len, num_targets)

    def preprocess(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        max_seq_len: int,
        timestamps: Optional[torch.Tensor],
        num_targets: Optional[torch.Tensor],
        contextual_embeddings: Optional[torch.Tensor],
        actions: Optional[torch.Tensor],
        input_name: str,
    ) -> PreprocessorOutput:
        """The input preprocessor on jagged ``values [L, D]``, or ``values`` as they are.

        Shared by :meth:`forward` and the KV-cache prefill / scoring paths. Without a
        preprocessor ``values`` must already be ``[L, embedding_dim]`` (``input_name`` names
        them in the error).
        """
        if self.input_preprocessor is not None:
            return self.input_preprocessor(
                values,
                offsets,
                max_seq_len,
                seq_timestamps=timestamps,
                num_targets=num_targets,
                contextual_embeddings=contextual_embeddings,
                seq_actions=actions,
            )
        if values.dim() != 2 or values.shape[1] != self.embedding_dim:
            raise ValueError(
                f"without an input_preprocessor {input_name} must be [L, {self.embedding_dim}]; "
                f"got {tuple(values.shape)}"
            )
        return PreprocessorOutput(values, offsets, timestamps, num_targets, max_seq_len)

    def forward(
        self,
        seq_embeddings: JaggedInput,
        seq_timestamps: Optional[Union[JaggedTensor, torch.Tensor]] = None,
        num_targets: Optional[torch.Tensor] = None,
        contextual_embeddings: Optional[torch.Tensor] = None,
        seq_actions: Optional[Union[JaggedTensor, torch.Tensor]] = None,
        max_seq_len: Optional[int] = None,
        batch_facts: Optional[JaggedBatchFacts] = None,
    ) -> HSTUTransducerOutput:
        """
        Host syncs: the inputs' values (offsets, lengths vs ``max_seq_len``, ``num_targets``)
        are checked once here (:meth:`check_batch_sync`, one host read) and their host facts
        travel down as ints; no layer, forward or backward, reads the device again. Pass
        ``batch_facts`` to skip that read too.

        Args:
            seq_embeddings: item embeddings, ``JaggedTensor`` ``[L, D]`` with ``B`` sequences, or
                the ``Dict[str, JaggedTensor]`` an ``EmbeddingCollection`` returns.
            seq_timestamps: optional ``[L]`` timestamps (seconds), tensor or JaggedTensor.
            num_targets: optional ``[B]`` trailing candidates per sequence.
            contextual_embeddings: ``[B, C, F]`` when the preprocessor has contextual tokens.
            seq_actions: optional ``[L]`` action bitmasks (action encoder).
            max_seq_len: batch maximum length; the longest length when None (required under
                tracing).
            batch_facts: :meth:`check_batch_sync` of these inputs (None: checked here).

        Returns:
            :class:`HSTUTransducerOutput`.
        """
        jt = select_jagged(seq_embeddings, self.feature_name)
        values, lengths = jagged_values_lengths(jt)
        offsets = lengths_to_offsets(lengths)
        if max_seq_len is None and is_tracing():
            raise ValueError("max_seq_len must be given when tracing/exporting HSTUTransducer")
        if batch_facts is None:
            batch_facts = check_jagged_batch_sync(offsets, values.shape[0], max_seq_len, num_targets)
        else:
            _check_facts_match(batch_facts, values.shape[0], lengths.numel(), num_targets, max_seq_len)
        if max_seq_len is None:
            assert batch_facts is not None  # None only while tracing, refused above without max_seq_len
            max_seq_len = batch_facts.max_seq_len
        pre = self.preprocess(
            values, offsets, max_seq_len, jagged_values(seq_timestamps), num_targets, contextual_embeddings,
            jagged_values(seq_actions), "seq_embeddings",
        )
        x = pre.seq_embeddings
        if self.positional_encoder is not None:
            x = self.positional_encoder(x, pre.seq_offsets, pre.seq_timestamps, pre.num_targets)
        x = self.input_dropout(x)
        stack_facts = with_prefix(batch_facts, self.contextual_seq_len, pre.max_seq_len)
        stack_out = self.stu_module(x, pre.seq_offsets, pre.max_seq_len, pre.num_targets, batch_facts=stack_facts)
        x, x_offsets = stack_out.x, stack_out.x_offsets
        timestamps = pre.seq_timestamps
        if stack_out.truncation_plan is not None and timestamps is not None:
            timestamps = stack_out.truncation_plan.apply(timestamps)
        total_targets = None if batch_facts is None else batch_facts.total_targets
        return self._compose_output(x, x_offsets, timestamps, pre.num_targets, total_targets)

    def _compose_output(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        timestamps: Optional[torch.Tensor],
        num_targets: Optional[torch.Tensor],
        total_targets: Optional[int],
    ) -> HSTUTransducerOutput:
        """Strip the contextual prefix, split off the candidates, post-process. ``total_targets``
        (from the host facts) sizes the candidates; None only while tracing."""
        batch_size = x_offsets.numel() - 1
        lengths = x_offsets[1:] - x_offsets[:-1]
        c = self.contextual_seq_len
        if c > 0:
            # Strip the contextual prefix so outputs align with the caller's tokens.
            prefix = lengths_to_offsets(torch.full_like(lengths, c))
            rest = lengths_to_offsets(lengths - c)
            total_rest = x.shape[0] - batch_size * c
            _, x = split_2D_jagged(x, prefix, rest, batch_size * c, total_rest)
            if timestamps is not None:
                _, timestamps = split_2D_jagged(timestamps, prefix, rest, batch_size * c, total_rest)
            x_offsets, lengths = rest, lengths - c
        targets = torch.zeros_like(lengths) if num_targets is None else num_targets.to(lengths.dtype)
        history_offsets = lengths_to_offsets(lengths - targets)
        target_offsets = lengths_to_offsets(targets)
        if total_targets is None:
            # Tracing: read the total once, as an unbacked size the candidates and their
            # timestamps share (each read would be a new one).
            total_targets = cast(int, target_offsets[-1].item())
            torch._check(total_targets >= 0)
            torch._check(total_targets <= x.shape[0])
        totals = (x.shape[0] - total_targets, total_targets)
        full: Optional[JaggedTensor] = None
        if self.return_full_embeddings:
            x = self.output_postprocessor(x, timestamps)
            full = jagged_tensor(x, x_offsets)
            _, candidates = split_2D_jagged(x, history_offsets, target_offsets, *totals)
        else:
            _, candidates = split_2D_jagged(x, history_offsets, target_offsets, *totals)
            candidate_timestamps = None
            if timestamps is not None:
                _, candidate_timestamps = split_2D_jagged(timestamps, history_offsets, target_offsets, *totals)
            candidates = self.output_postprocessor(candidates, candidate_timestamps)
        return HSTUTransducerOutput(
            candidate_embeddings=jagged_tensor(candidates, target_offsets),
            full_embeddings=full,
            full_timestamps=timestamps if self.return_full_embeddings else None,
        )

    # ---------------------------------------------------------------- KV-cached inference

    def _uses_time(self) -> bool:
        return self.positional_encoder is not None and self.positional_encoder.use_time_encoding

    def prefill(
        self,
        history: JaggedInput,
        max_seq_len: int,
        seq_timestamps: Optional[Union[JaggedTensor, torch.Tensor]] = None,
        query_timestamps: Optional[torch.Tensor] = None,
        contextual_embeddings: Optional[torch.Tensor] = None,
        seq_actions: Optional[Union[JaggedTensor, torch.Tensor]] = None,
        batch_key: Optional[torch.Tensor] = None,
    ) -> HSTUKVCache:
        """Encode user histories once and return their cache (run under ``torch.no_grad()``).

        The history tokens go through the preprocessor (contextual tokens prepended),
        positional encoder and STU stack exactly as in a full forward of ``[history |
        candidates]``: position indices count back from the end of the history either way,
        and time buckets are measured from ``query_timestamps`` (the timestamp the last
        candidate will carry). The histories' values are checked once (one host read).

        Args:
            history: ``JaggedTensor`` ``[Lh, D_in]`` of ``B`` histories (or an
                ``EmbeddingCollection`` output dict).
            max_seq_len: batch maximum of history + candidates over the candidate sets this
                cache will score (the ``max_seq_len`` a full forward would get).
            seq_timestamps: ``[Lh]`` history timestamps (needed with time encoding).
            query_timestamps: ``[B]`` request time per user (needed with time encoding).
            contextual_embeddings: ``[B, C, F]`` when the preprocessor has contextual tokens.
            seq_actions: ``[Lh]`` action bitmasks when the preprocessor encodes actions.
            batch_key: optional ``[B]`` tensor (e.g. user ids) checked at every scoring step.

        Returns:
            :class:`~torchrec_hstu.modules.kv_cache.HSTUKVCache`.

        Example::

            >>> from torchrec_hstu.modules import STULayer, STUStack
            >>> model = HSTUTransducer(STUStack([STULayer(16, 2, 8, 8, output_dropout_ratio=0.0)])).eval()
            >>> history = JaggedTensor(values=torch.randn(5, 16), lengths=torch.tensor([2, 3]))
            >>> with torch.no_grad():
            ...     cache = model.prefill(history, max_seq_len=5)
            ...     cands = JaggedTensor(values=torch.randn(4, 16), lengths=torch.tensor([2, 2]))
            ...     scored = model.score_candidates(cands, cache, history_offsets=history.offsets())
            >>> scored.values().shape
            torch.Size([4, 16])
        """
        values, lengths = jagged_values_lengths(select_jagged(history, self.feature_name))
        offsets = lengths_to_offsets(lengths)
        batch_size = offsets.numel() - 1
        timestamps = jagged_values(seq_timestamps)
        if self._uses_time():
            if timestamps is None or query_timestamps is None:
                raise ValueError(
                    "with time encoding, prefill needs seq_timestamps [Lh] and query_timestamps [B] "
                    "(the request time: the timestamp of the last candidate; history time buckets count from it)"
                )
            if query_timestamps.shape != (batch_size,):
                raise ValueError(f"query_timestamps must be [B]=[{batch_size}]; got {tuple(query_timestamps.shape)}")
        facts = check_jagged_batch_sync(offsets, values.shape[0], max_seq_len)
        pre = self.preprocess(
            values, offsets, max_seq_len, timestamps, None, contextual_embeddings, jagged_values(seq_actions), "history"
        )
        x = pre.seq_embeddings
        if self.positional_encoder is not None:
            # One stand-in "target" per sequence carrying the request time: history positions count
            # back from the history end and time buckets from the request, as in the full forward.
            ones = lengths_to_offsets(torch.ones(batch_size, dtype=torch.int64, device=x.device))
            x_full = concat_2D_jagged(x, x.new_zeros(batch_size, x.shape[1]), pre.seq_offsets, ones)
            ts_full = None
            if pre.seq_timestamps is not None and query_timestamps is not None:
                ts_full = concat_2D_jagged(
                    pre.seq_timestamps, query_timestamps.to(pre.seq_timestamps.dtype), pre.seq_offsets, ones
                )
            encoded = self.positional_encoder(
                x_full, pre.seq_offsets + ones, ts_full, torch.ones(batch_size, dtype=torch.int64, device=x.device)
            )
            x, _ = split_2D_jagged(encoded, pre.seq_offsets, ones, x.shape[0], batch_size)
        x = self.input_dropout(x)
        _, stack_cache = self.stu_module.prefill(
            x,
            pre.seq_offsets,
            pre.max_seq_len,
            batch_key=batch_key,
            batch_facts=with_prefix(facts, self.contextual_seq_len, pre.max_seq_len),
        )
        return HSTUKVCache(
            stack=stack_cache,
            history_offsets=offsets,
            max_seq_len=max_seq_len,
            query_timestamps=None if query_timestamps is None else query_timestamps.detach().clone(),
            transducer_id=id(self),
        )

    def score_candidates(
        self,
        candidates: JaggedInput,
        cache: HSTUKVCache,
        history_offsets: torch.Tensor,
        candidate_timestamps: Optional[Union[JaggedTensor, torch.Tensor]] = None,
        candidate_actions: Optional[Union[JaggedTensor, torch.Tensor]] = None,
        batch_key: Optional[torch.Tensor] = None,
    ) -> JaggedTensor:
        """Encode one candidate set per user against the cached histories; the cache is unchanged.

        Equals ``self(history ++ candidates, num_targets=candidate lengths,
        max_seq_len=cache.max_seq_len).candidate_embeddings`` (post-processed), for any number
        of candidate sets scored against one cache. The step's values (history offsets,
        ``batch_key``, candidate lengths, request time) are checked with one host read.

        Args:
            candidates: ``JaggedTensor`` ``[Lt, D_in]``, ``T_b`` candidates per user (``T_b >= 0``).
            cache: from :meth:`prefill`.
            history_offsets: ``[B + 1]`` offsets of the histories the caller expects the cache to
                hold (``ValueError`` if they are another batch's).
            candidate_timestamps: ``[Lt]`` (needed with time encoding; each user's last candidate
                must carry the cache's ``query_timestamps``).
            candidate_actions: ``[Lt]`` when the preprocessor encodes actions (targets get the
                target embedding whatever the bits).
            batch_key: must equal the prefill's ``batch_key`` when one was given.

        Returns:
            ``JaggedTensor`` ``[Lt, d]`` of post-processed candidate embeddings, lengths ``T_b``.
        """
        if not isinstance(cache, HSTUKVCache):
            raise ValueError(f"cache must be an HSTUKVCache from HSTUTransducer.prefill; got {type(cache)}")
        if cache.transducer_id != id(self):
            raise ValueError("cache was built by another HSTUTransducer")
        same_history = prefix_offsets_flag(cache.history_offsets, history_offsets, "HSTUKVCache")
        values, lengths = jagged_values_lengths(select_jagged(candidates, self.feature_name))
        offsets = lengths_to_offsets(lengths)
        batch_size = offsets.numel() - 1
        if batch_size != cache.stack.batch_size:
            raise ValueError(
                f"candidates have B={batch_size} sequences but the cache holds {cache.stack.batch_size} users"
            )
        timestamps = jagged_values(candidate_timestamps)
        stale = None
        if self._uses_time():
            if timestamps is None:
                raise ValueError("with time encoding, score_candidates needs candidate_timestamps [Lt]")
            if not is_tracing() and values.shape[0] > 0:
                last = timestamps[torch.clamp(offsets[1:] - 1, min=0)]
                stale = ((lengths > 0) & (last != cast(torch.Tensor, cache.query_timestamps).to(last.dtype))).any()
        flags = [same_history, batch_key_flag(cache.stack.batch_key, batch_key), stale]
        stats = delta_step_stats_sync(cache.stack.offsets, offsets, values.shape[0], lengths, flags)
        check_prefix_offsets(stats, 0, cache.history_offsets, history_offsets, "HSTUKVCache")
        check_batch_key(stats, 1)
        if stats is not None and stats.flags[2]:
            raise ValueError(
                "each user's last candidate must carry the request time the cache was prefilled with "
                "(query_timestamps): history time buckets were measured from it; prefill again for a "
                "new request time"
            )
        c = self.contextual_seq_len
        contextual = None
        if self.input_preprocessor is not None and c > 0:
            # Stand-in contextual tokens (stripped below): they put the candidates at positions >= c.
            contextual = values.new_zeros(batch_size, c, self.input_preprocessor.contextual_feature_dim)
        pre = self.preprocess(
            values, offsets, cache.max_seq_len, timestamps, lengths, contextual, jagged_values(candidate_actions),
            "candidates",
        )
        x, x_offsets, x_timestamps = pre.seq_embeddings, pre.seq_offsets, pre.seq_timestamps
        if self.positional_encoder is not None:
            # Candidates are targets: position index c, time bucket from the last candidate.
            x = self.positional_encoder(x, x_offsets, x_timestamps, lengths)
        if c > 0:
            prefix = lengths_to_offsets(torch.full_like(lengths, c))
            _, x = split_2D_jagged(x, prefix, offsets, batch_size * c, values.shape[0])
        x = self.input_dropout(x)
        out, _ = self.stu_module.cached_forward(
            x,
            cache.stack,
            prefix_offsets=cache.stack.offsets,
            delta_offsets=offsets,
            num_targets=lengths,
            batch_key=batch_key,
            step_stats=stats,
        )
        return jagged_tensor(self.output_postprocessor(out, timestamps), offsets)


def _check_facts_match(
    facts: JaggedBatchFacts,
    total_len: int,
    batch_size: int,
    num_targets: Optional[torch.Tensor],
    max_seq_len: Optional[int],
) -> None:
    """Free checks that caller-given ``batch_facts`` describe these inputs."""
    if (
        facts.batch_size != batch_size
        or facts.total_len != total_len
        or (facts.num_targets is None) != (num_targets is None)
    ):
        raise ValueError(
            f"batch_facts describe {facts.batch_size} sequences, {facts.total_len} tokens, "
            f"{'no ' if facts.num_targets is None else ''}num_targets; the inputs have {batch_size} sequences, "
            f"{total_len} tokens, {'no ' if num_targets is None else ''}num_targets: pass the facts of "
            "these inputs (check_batch_sync)"
        )
    if max_seq_len is not None and facts.longest > max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} is smaller than the longest sequence ({facts.longest} tokens)")
