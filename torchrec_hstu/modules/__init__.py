"""nn.Modules of HSTU that take torchrec types (JaggedTensor / EmbeddingCollection outputs)."""

from torchrec_hstu.modules.hstu_transducer import HSTUTransducer, HSTUTransducerOutput
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
    "HSTUTransducerOutput",
    "L2NormPostprocessor",
    "LayerNormPostprocessor",
    "OutputPostprocessor",
    "PreprocessorOutput",
    "STULayer",
    "STULayerConfig",
    "STUStack",
    "STUStackOutput",
    "TimestampLayerNormPostprocessor",
]
