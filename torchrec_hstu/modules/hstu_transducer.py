"""HSTUTransducer: preprocessor -> positional encoder -> STU stack -> postprocessor, on torchrec types."""

import dataclasses
import logging
from typing import Dict, Optional, Union

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.ops.common import HSTUKernel, is_tracing, to_kernel
from torchrec_hstu.ops.jagged import lengths_to_offsets, split_2D_jagged
from torchrec_hstu.modules.positional_encoder import HSTUPositionalEncoder
from torchrec_hstu.modules.postprocessors import L2NormPostprocessor, OutputPostprocessor
from torchrec_hstu.modules.preprocessors import ContextualPreprocessor, PreprocessorOutput
from torchrec_hstu.modules.stu import STULayer, STUStack

logger = logging.getLogger(__name__)

JaggedInput = Union[JaggedTensor, Dict[str, JaggedTensor]]


def jagged_values_lengths(jt: JaggedTensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """``(values, lengths)`` of a JaggedTensor without fbgemm ops (CUDA-safe)."""
    lengths = jt.lengths_or_none()
    if lengths is None:
        offsets = jt.offsets()
        lengths = offsets[1:] - offsets[:-1]
    return jt.values(), lengths


def jagged_tensor(values: torch.Tensor, offsets: torch.Tensor) -> JaggedTensor:
    """A JaggedTensor with both lengths and offsets set (no fbgemm call later)."""
    return JaggedTensor(values=values, lengths=offsets[1:] - offsets[:-1], offsets=offsets)


def jagged_values(x: Optional[Union[JaggedTensor, torch.Tensor]]) -> Optional[torch.Tensor]:
    """The values of a JaggedTensor; a tensor (or None) as it is."""
    return x.values() if isinstance(x, JaggedTensor) else x


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
        first = stu_module.layers[0]
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
        for layer in stu_module.layers:
            if layer.attention_options.contextual_seq_len != self.contextual_seq_len:
                raise ValueError(
                    f"STU contextual_seq_len={layer.attention_options.contextual_seq_len} differs from the "
                    f"preprocessor's contextual prefix {self.contextual_seq_len}; build layers with "
                    "contextual_seq_len=-1 through HSTUTransducer.from_layer_kwargs or set it equal"
                )

    @classmethod
    def from_layer_kwargs(
        cls,
        stu: Dict,
        attn_num_layers: int,
        input_preprocessor: Optional[ContextualPreprocessor] = None,
        attn_truncation_split_layer: int = 0,
        attn_truncation_tail_len: int = 0,
        kernel: Union[HSTUKernel, str] = HSTUKernel.PYTORCH,
        **kwargs,
    ) -> "HSTUTransducer":
        """Build ``attn_num_layers`` identical layers from one STU kwargs dict.

        ``stu["contextual_seq_len"] == -1`` (or missing) takes the preprocessor's prefix.
        """
        stu = dict(stu)
        contextual = input_preprocessor.contextual_seq_len() if input_preprocessor is not None else 0
        if stu.get("contextual_seq_len", -1) < 0:
            stu["contextual_seq_len"] = contextual
        layers = [STULayer(kernel=kernel, **stu) for _ in range(attn_num_layers)]
        stack = STUStack(layers, attn_truncation_split_layer, attn_truncation_tail_len)
        return cls(stack, input_preprocessor=input_preprocessor, **kwargs)

    @classmethod
    def from_config(cls, config: "hstu_pb2.HSTU", **kwargs: object) -> "HSTUTransducer":
        """Build from an ``HSTU`` proto message; see :func:`torchrec_hstu.config.build_transducer`."""
        from torchrec_hstu.config.builders import build_transducer

        return build_transducer(config, **kwargs)

    def set_kernel(self, kernel: Union[HSTUKernel, str]) -> None:
        """Set the attention kernel of every STU layer."""
        kernel = to_kernel(kernel)
        for layer in self.stu_module.layers:
            layer.kernel = kernel

    def _select(self, seq_embeddings: JaggedInput) -> JaggedTensor:
        if isinstance(seq_embeddings, JaggedTensor):
            return seq_embeddings
        if isinstance(seq_embeddings, dict):
            if self.feature_name is not None:
                if self.feature_name not in seq_embeddings:
                    raise KeyError(
                        f"feature_name {self.feature_name!r} not in the embeddings dict "
                        f"(keys: {sorted(seq_embeddings)})"
                    )
                return seq_embeddings[self.feature_name]
            if len(seq_embeddings) == 1:
                return next(iter(seq_embeddings.values()))
            raise ValueError(
                f"the embeddings dict has keys {sorted(seq_embeddings)}; set feature_name to pick one"
            )
        raise TypeError(
            f"seq_embeddings must be a JaggedTensor or Dict[str, JaggedTensor]; got {type(seq_embeddings)}"
        )

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
    ) -> HSTUTransducerOutput:
        """
        Args:
            seq_embeddings: item embeddings, ``JaggedTensor`` ``[L, D]`` with ``B`` sequences, or
                the ``Dict[str, JaggedTensor]`` an ``EmbeddingCollection`` returns.
            seq_timestamps: optional ``[L]`` timestamps (seconds), tensor or JaggedTensor.
            num_targets: optional ``[B]`` trailing candidates per sequence.
            contextual_embeddings: ``[B, C, F]`` when the preprocessor has contextual tokens.
            seq_actions: optional ``[L]`` action bitmasks (action encoder).
            max_seq_len: batch maximum length; computed from the lengths when None
                (required under tracing).

        Returns:
            :class:`HSTUTransducerOutput`.
        """
        jt = self._select(seq_embeddings)
        values, lengths = jagged_values_lengths(jt)
        offsets = lengths_to_offsets(lengths)
        timestamps = jagged_values(seq_timestamps)
        if max_seq_len is None:
            if is_tracing():
                raise ValueError("max_seq_len must be given when tracing/exporting HSTUTransducer")
            max_seq_len = max(int(lengths.max()), 1) if lengths.numel() > 0 else 1
        pre = self.preprocess(
            values, offsets, max_seq_len, timestamps, num_targets, contextual_embeddings,
            jagged_values(seq_actions), "seq_embeddings",
        )
        x = pre.seq_embeddings
        if self.positional_encoder is not None:
            x = self.positional_encoder(x, pre.seq_offsets, pre.seq_timestamps, pre.num_targets)
        x = self.input_dropout(x)
        stack_out = self.stu_module(x, pre.seq_offsets, pre.max_seq_len, pre.num_targets)
        x, x_offsets = stack_out.x, stack_out.x_offsets
        timestamps = pre.seq_timestamps
        if stack_out.truncation_plan is not None and timestamps is not None:
            timestamps = stack_out.truncation_plan.apply(timestamps)
        return self._compose_output(x, x_offsets, timestamps, pre.num_targets)

    def _compose_output(
        self,
        x: torch.Tensor,
        x_offsets: torch.Tensor,
        timestamps: Optional[torch.Tensor],
        num_targets: Optional[torch.Tensor],
    ) -> HSTUTransducerOutput:
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
        # Read the totals once: under torch.export each read is a new unbacked size, and the
        # candidates and their timestamps must share one.
        total_targets = target_offsets[-1].item()
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
