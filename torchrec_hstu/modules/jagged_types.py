"""torchrec's ``JaggedTensor`` at the modules' edge: the leaf every module imports for it.

Modules take ``JaggedTensor`` / ``Dict[str, JaggedTensor]`` (what ``EmbeddingCollection``
returns, notes decision 10) and work on ``values [L, *D]`` + ``offsets [B + 1]`` inside. These
helpers convert at that edge without fbgemm ops (CUDA-safe) and without reading the device: a
``JaggedTensor`` built from lengths keeps them, and its offsets are computed on the device.
``ops/`` stays free of torchrec, so they live here rather than in ``ops/jagged.py``.
"""

from typing import Dict, Optional, Tuple, Union, overload

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

#: A JaggedTensor, or the per-feature dict an ``EmbeddingCollection`` returns.
JaggedInput = Union[JaggedTensor, Dict[str, JaggedTensor]]


def jagged_values_lengths(jt: JaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values, lengths)`` of a JaggedTensor without fbgemm ops (CUDA-safe, no host read)."""
    lengths = jt.lengths_or_none()
    if lengths is None:
        offsets = jt.offsets()
        lengths = offsets[1:] - offsets[:-1]
    return jt.values(), lengths


def jagged_tensor(values: torch.Tensor, offsets: torch.Tensor) -> JaggedTensor:
    """A JaggedTensor with both lengths and offsets set (no fbgemm call later)."""
    return JaggedTensor(values=values, lengths=offsets[1:] - offsets[:-1], offsets=offsets)


@overload
def jagged_values(x: Union[JaggedTensor, torch.Tensor]) -> torch.Tensor: ...


@overload
def jagged_values(x: None) -> None: ...


@overload
def jagged_values(x: Optional[Union[JaggedTensor, torch.Tensor]]) -> Optional[torch.Tensor]: ...


def jagged_values(x: Optional[Union[JaggedTensor, torch.Tensor]]) -> Optional[torch.Tensor]:
    """The values of a JaggedTensor; a tensor (or None) as it is."""
    return x.values() if isinstance(x, JaggedTensor) else x


def select_jagged(seq_embeddings: JaggedInput, feature_name: Optional[str]) -> JaggedTensor:
    """The JaggedTensor to encode: ``seq_embeddings`` itself, or ``seq_embeddings[feature_name]``
    of an embeddings dict (its only entry when ``feature_name`` is None)."""
    if isinstance(seq_embeddings, JaggedTensor):
        return seq_embeddings
    if isinstance(seq_embeddings, dict):
        if feature_name is not None:
            if feature_name not in seq_embeddings:
                raise KeyError(
                    f"feature_name {feature_name!r} not in the embeddings dict "
                    f"(keys: {sorted(seq_embeddings)})"
                )
            return seq_embeddings[feature_name]
        if len(seq_embeddings) == 1:
            return next(iter(seq_embeddings.values()))
        raise ValueError(
            f"the embeddings dict has keys {sorted(seq_embeddings)}; set feature_name to pick one"
        )
    raise TypeError(
        f"seq_embeddings must be a JaggedTensor or Dict[str, JaggedTensor]; got {type(seq_embeddings)}"
    )
