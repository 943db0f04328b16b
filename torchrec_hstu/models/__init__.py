"""End-to-end models on the HSTU modules: generative retrieval and DLRM-HSTU ranking."""

from torchrec_hstu.models.baselines import FirstOrderMarkov, MostPopular
from torchrec_hstu.models.metrics import RankAccumulator, metrics_from_ranks, target_ranks
from torchrec_hstu.models.ranking import (
    HSTURanking,
    HSTURankingTrain,
    default_multi_channel,
    default_ranking_transducer,
)
from torchrec_hstu.models.retrieval import (
    NEGATIVE_STRATEGIES,
    HSTURetrieval,
    HSTURetrievalTrain,
    default_retrieval_transducer,
    gap_buckets,
    sample_negatives,
)

__all__ = [
    "FirstOrderMarkov",
    "HSTURanking",
    "HSTURankingTrain",
    "HSTURetrieval",
    "HSTURetrievalTrain",
    "MostPopular",
    "NEGATIVE_STRATEGIES",
    "RankAccumulator",
    "default_multi_channel",
    "default_ranking_transducer",
    "default_retrieval_transducer",
    "gap_buckets",
    "metrics_from_ranks",
    "sample_negatives",
    "target_ranks",
]
