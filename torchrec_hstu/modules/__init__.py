"""nn.Modules of HSTU that take torchrec types (JaggedTensor / EmbeddingCollection outputs).

Imports point down: ``jagged_types`` (torchrec types) and ``kv_cache`` (cache data and checks)
are leaves over ``ops``; ``stu`` uses ``kv_cache``; ``hstu_transducer`` uses ``stu``;
``multi_channel`` uses ``hstu_transducer``. Host syncs happen once per batch at the edge (the
``check_batch_sync`` of the module called), never per layer.
"""

from torchrec_hstu.modules.hstu_transducer import HSTUTransducer, HSTUTransducerOutput
from torchrec_hstu.modules.jagged_types import JaggedInput, jagged_tensor, jagged_values, jagged_values_lengths
from torchrec_hstu.modules.kv_cache import (
    HSTUKVCache,
    STULayerKVCache,
    STUStackKVCache,
    prefill_transducer,
    score_candidates,
)
from torchrec_hstu.modules.multi_channel import MultiChannelBatchFacts, MultiChannelHSTU, MultiChannelHSTUOutput
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
    "JaggedInput",
    "L2NormPostprocessor",
    "MultiChannelBatchFacts",
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
    "jagged_tensor",
    "jagged_values",
    "jagged_values_lengths",
    "prefill_transducer",
    "score_candidates",
]
