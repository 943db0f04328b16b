"""Distributed training of HSTU models with torchrec ``DistributedModelParallel``.

* :mod:`~torchrec_hstu.distributed.sharding`: plan (``EmbeddingShardingPlanner``, table-wise /
  row-wise) and wrap a model in DMP; one keyed optimizer; the loss scaling that makes ``W``
  ranks train like one process.
* :mod:`~torchrec_hstu.distributed.data`: global batches and each rank's share; padded
  evaluation shards.
* :mod:`~torchrec_hstu.distributed.metrics`: sums and gathers across ranks.
* :mod:`~torchrec_hstu.distributed.errors`: ``@record_errors``, torchrun's ``@record`` writing
  each rank's error file completely (write, then rename).
* :mod:`~torchrec_hstu.distributed.checkpoint`: sharded checkpoints with
  ``torch.distributed.checkpoint`` that load at any world size, and never unpickle code.

``examples/train_dmp.py`` puts them together; ``docs/distributed.md`` has the commands.
"""

from torchrec_hstu.distributed.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    checkpoint_path,
    consolidate_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_dcp_metadata,
    read_manifest,
    read_tensors,
    save_checkpoint,
)
from torchrec_hstu.distributed.data import (
    epoch_permutation,
    eval_shards,
    num_global_batches,
    rank_slice,
    step_generator,
    train_shards,
)
from torchrec_hstu.distributed.errors import AtomicErrorHandler, record_errors
from torchrec_hstu.distributed.metrics import all_gather_1d, all_reduce_sum
from torchrec_hstu.distributed.sharding import (
    EMBEDDING_OPTIMIZERS,
    SHARDING_CHOICES,
    EmbeddingOptimizerConfig,
    build_optimizer,
    describe_plan,
    embedding_table_names,
    global_mean_scale,
    plan_sharding,
    shard_model,
)

__all__ = [
    "AtomicErrorHandler",
    "CheckpointError",
    "CheckpointInfo",
    "EMBEDDING_OPTIMIZERS",
    "EmbeddingOptimizerConfig",
    "SHARDING_CHOICES",
    "all_gather_1d",
    "all_reduce_sum",
    "build_optimizer",
    "checkpoint_path",
    "consolidate_checkpoint",
    "describe_plan",
    "embedding_table_names",
    "epoch_permutation",
    "eval_shards",
    "global_mean_scale",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "num_global_batches",
    "plan_sharding",
    "rank_slice",
    "read_dcp_metadata",
    "read_manifest",
    "read_tensors",
    "record_errors",
    "save_checkpoint",
    "shard_model",
    "step_generator",
    "train_shards",
]
