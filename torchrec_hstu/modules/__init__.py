"""nn.Modules of HSTU that take torchrec types (JaggedTensor / EmbeddingCollection outputs)."""

from torchrec_hstu.modules.hstu_transducer import HSTUTransducer, HSTUTransducerOutput
from torchrec_hstu.modules.kv_cache import (
    HSTUKVCache,
    STULayerKVCache,
    STUStackKVCache,
    prefill_transducer,
    score_candidates,
)
from torchrec_hstu.modules.multi_channel import MultiChannelHSTU, MultiChannelHSTUOutput
from torchrec_hstu.modules.positional_encoder import HSTUPositionalEncoder
from torchrec_hstu.modules.postprocessors import (
    L2NormPostprocessor,
    LayerNormPostprocessor,
    OutputPostprocessor,
    TimestampLayerNormPostprocessor,
)
from torchrec_hstu.modules.preprocessors import (
    ActionEncoder,
    ContextualPreprocessor,
    PreprocessorOutput,
)
from torchrec_hstu.modules.stu import STULayer, STULayerConfig, STUStack, STUStackOutput

__all__ = [
    "ActionEncoder",
    "ContextualPreprocessor",
    "HSTUPositionalEncoder",
    "HSTUTransducer",
    "HSTUKVCache",
    "HSTUTransducerOutput",
    "L2NormPostprocessor",
    "MultiChannelHSTU",
    "MultiChannelHSTUOutput",
    "LayerNormPostprocessor",
    "OutputPostprocessor",
    "PreprocessorOutput",
    "STULayer",
    "STULayerConfig",
    "STULayerKVCache",
    "STUStack",
    "STUStackKVCache",
    "STUStackOutput",
    "TimestampLayerNormPostprocessor",
    "prefill_transducer",
    "score_candidates",
]
