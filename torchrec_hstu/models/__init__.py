"""End-to-end models on the HSTU modules: generative retrieval (and its SASRec baseline) and
DLRM-HSTU ranking."""

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
    SequentialRetrieval,
    default_retrieval_transducer,
    drop_last_tokens,
    gap_buckets,
    next_item_positions,
    sample_negatives,
)
from torchrec_hstu.models.sasrec import SASRecRetrieval

__all__ = [
    "FirstOrderMarkov",
    "HSTURanking",
    "HSTURankingTrain",
    "HSTURetrieval",
    "HSTURetrievalTrain",
    "MostPopular",
    "NEGATIVE_STRATEGIES",
    "RankAccumulator",
    "SASRecRetrieval",
    "SequentialRetrieval",
    "default_multi_channel",
    "default_ranking_transducer",
    "default_retrieval_transducer",
    "gap_buckets",
    "drop_last_tokens",
    "metrics_from_ranks",
    "next_item_positions",
    "sample_negatives",
    "target_ranks",
]
