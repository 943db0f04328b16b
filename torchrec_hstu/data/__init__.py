"""Data: jagged interaction sequences, built-in synthetic data sets, MovieLens (100K, 1M, 20M) / CSV readers."""

from torchrec_hstu.data.ranking import RankingBatch, iterate_ranking_batches, make_ranking_batch, split_users
from torchrec_hstu.data.readers import (
    FORMATS,
    DataFormatError,
    read_interactions,
    read_interactions_csv,
    read_movielens_1m,
    read_movielens_20m,
    read_movielens_100k,
)
from torchrec_hstu.data.sequences import (
    RetrievalSplit,
    SequenceBatch,
    SequenceDataset,
    iterate_batches,
    leave_last_out,
    make_batch,
)
from torchrec_hstu.data.synthetic import (
    ImpressionConfig,
    Impressions,
    RingSequenceConfig,
    RingSequences,
    generate_impressions,
    generate_ring_sequences,
)

__all__ = [
    "FORMATS",
    "DataFormatError",
    "ImpressionConfig",
    "Impressions",
    "RankingBatch",
    "RetrievalSplit",
    "RingSequenceConfig",
    "RingSequences",
    "SequenceBatch",
    "SequenceDataset",
    "generate_impressions",
    "generate_ring_sequences",
    "iterate_batches",
    "iterate_ranking_batches",
    "leave_last_out",
    "make_batch",
    "make_ranking_batch",
    "read_interactions",
    "read_interactions_csv",
    "read_movielens_1m",
    "read_movielens_20m",
    "read_movielens_100k",
    "split_users",
]
