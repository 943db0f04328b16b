"""Sharding HSTU models with torchrec's ``DistributedModelParallel`` (DMP).

The item tables (every ``EmbeddingCollection``) are sharded by torchrec's
``EmbeddingShardingPlanner``: table-wise or row-wise as it chooses (``"auto"``) or as forced;
their optimizer is fused into the backward of the FBGEMM kernel. Everything else (the HSTU
transducer, heads, small ``nn.Embedding`` tables) is replicated and data-parallel (DDP).

Gradient convention (torchrec's): DDP averages the dense gradients over ranks, and the
sharded embedding backward divides by the world size too (torchrec's gradient division, on by
default; :func:`shard_model` refuses to run with it off). A rank's loss is therefore scaled
to ``W * (sum of its per-example terms) / (global number of examples)``
(:func:`global_mean_scale`): the mean over ranks of these losses is the global-batch mean, and
both gradients equal the gradient of the global-batch mean. ``W`` ranks with ``B`` examples
each train exactly like one process with ``W * B`` examples (up to float summation order),
also when ranks hold different numbers of examples (jagged sequences).
"""

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

logger = logging.getLogger(__name__)

#: ``--sharding`` choices: ``auto`` lets the planner pick among table-wise and row-wise.
SHARDING_CHOICES = ("auto", "table_wise", "row_wise", "column_wise")
AUTO_SHARDING_TYPES = ("table_wise", "row_wise")

#: Embedding optimizers (FBGEMM fused, applied inside the backward) by name.
#: ``rowwise_adagrad``: one accumulator per row (torchrec's default choice); ``adagrad``:
#: one per element (equals ``torch.optim.Adagrad``); ``adam``: FBGEMM Adam on the rows a batch
#: touches (no CPU kernel in fbgemm-gpu-cpu 1.8, so GPU only and not run here).
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam")
_CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad")


@dataclasses.dataclass(frozen=True)
class EmbeddingOptimizerConfig:
    """The fused optimizer of the sharded item tables.

    Attributes:
        name: one of :data:`EMBEDDING_OPTIMIZERS`.
        lr: learning rate.
        eps: epsilon of the (row-wise) Adagrad / Adam denominators.
        beta1: Adam first-moment decay.
        beta2: Adam second-moment decay.
        weight_decay: L2 weight decay (FBGEMM's, applied to the rows a batch touches).
    """

    name: str = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding optimizer must be one of {EMBEDDING_OPTIMIZERS}; got {self.name!r}")
        if self.lr <= 0:
            raise ValueError(f"embedding optimizer lr must be > 0; got {self.lr}")

    def fused_params(self, device_type: str) -> Dict[str, Any]:
        """FBGEMM keyword arguments of the table-batched embedding kernel.

        Args:
            device_type: ``"cpu"`` or ``"cuda"``; on CPU only :data:`_CPU_EMBEDDING_OPTIMIZERS`
                exist in FBGEMM, others are refused here rather than deep inside FBGEMM.
        """
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        if device_type == "cpu" and self.name not in _CPU_EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding optimizer {self.name!r} has no CPU kernel in FBGEMM; on CPU use one of "
                f"{_CPU_EMBEDDING_OPTIMIZERS}"
            )
        kind = {
            "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "adam": EmbOptimType.ADAM,
        }[self.name]
        params: Dict[str, Any] = {"optimizer": kind, "learning_rate": self.lr, "eps": self.eps}
        if self.name == "adam":
            params.update(beta1=self.beta1, beta2=self.beta2)
        if self.weight_decay:
            params["weight_decay"] = self.weight_decay
        return params


def embedding_table_names(module: nn.Module) -> List[str]:
    """Names of the tables of every ``EmbeddingCollection`` inside ``module``."""
    names: List[str] = []
    for sub in module.modules():
        if isinstance(sub, EmbeddingCollection):
            names.extend(config.name for config in sub.embedding_configs())
    return names


def plan_sharding(
    module: nn.Module,
    world_size: int,
    device_type: str,
    sharding: str = "auto",
    embedding_optimizer: EmbeddingOptimizerConfig = EmbeddingOptimizerConfig(),
    batch_size_per_rank: Optional[int] = None,
    local_world_size: Optional[int] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> Tuple[ShardingPlan, List[EmbeddingCollectionSharder]]:
    """Plan the sharding of ``module``'s item tables with ``EmbeddingShardingPlanner``.

    Collective when a process group is initialized: rank 0 plans, every rank receives the plan.

    Args:
        module: the unsharded model (e.g. ``HSTURetrievalTrain``).
        world_size: number of ranks.
        device_type: ``"cpu"`` or ``"cuda"`` (the planner's compute device).
        sharding: ``"auto"`` (planner picks table-wise or row-wise per table) or a forced
            torchrec sharding type from :data:`SHARDING_CHOICES`.
        embedding_optimizer: the fused optimizer of the tables.
        batch_size_per_rank: sequences per rank (the planner's cost model), if known.
        local_world_size: ranks per host (torchrun's ``LOCAL_WORLD_SIZE``); default: all.
        process_group: default: the world.

    Returns:
        ``(plan, sharders)`` for :func:`shard_model`.
    """
    if sharding not in SHARDING_CHOICES:
        raise ValueError(f"sharding must be one of {SHARDING_CHOICES}; got {sharding!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    tables = embedding_table_names(module)
    if not tables:
        raise ValueError("module has no EmbeddingCollection to shard")
    if "items" in tables:
        raise ValueError("a table named 'items' collides with nn.ModuleDict.items under DMP; rename it")
    types = list(AUTO_SHARDING_TYPES) if sharding == "auto" else [sharding]
    constraints = {name: ParameterConstraints(sharding_types=types) for name in tables}
    sharders = [EmbeddingCollectionSharder(fused_params=embedding_optimizer.fused_params(device_type))]
    kwargs: Dict[str, Any] = {}
    if batch_size_per_rank is not None:
        kwargs["batch_size"] = batch_size_per_rank
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device_type, local_world_size=local_world_size),
        constraints=constraints,
        **kwargs,
    )
    if dist.is_available() and dist.is_initialized():
        plan = planner.collective_plan(module, sharders, process_group or dist.GroupMember.WORLD)
    else:
        plan = planner.plan(module, sharders)
    return plan, sharders


def describe_plan(plan: ShardingPlan) -> Dict[str, Dict[str, Any]]:
    """JSON-able summary: per table its sharding type, kernel, ranks and shard rows/cols."""
    out: Dict[str, Dict[str, Any]] = {}
    for module_path, module_plan in plan.plan.items():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if spec.sharding_spec is not None and hasattr(spec.sharding_spec, "shards"):
                for shard in spec.sharding_spec.shards:
                    shards.append(
                        {"offsets": list(shard.shard_offsets), "sizes": list(shard.shard_sizes),
                         "placement": str(shard.placement)}
                    )
            out[f"{module_path}.{table}"] = {
                "sharding_type": spec.sharding_type,
                "compute_kernel": spec.compute_kernel,
                "ranks": list(spec.ranks or []),
                "shards": shards,
            }
    return out


def shard_model(
    module: nn.Module,
    plan: ShardingPlan,
    sharders: Sequence[EmbeddingCollectionSharder],
    device: torch.device,
) -> DistributedModelParallel:
    """Wrap ``module`` in DMP: tables sharded by ``plan``, the rest replicated (DDP).

    Every rank must pass a module with the same initial weights (build it after seeding
    identically): each rank's table shards are copied from its own copy of the full table.

    Args:
        module: the unsharded model built on CPU (tables included).
        plan: from :func:`plan_sharding`.
        sharders: from :func:`plan_sharding`.
        device: this rank's device (``cpu`` or ``cuda:<local_rank>``).

    Returns:
        The ``DistributedModelParallel`` (``dmp.module`` is ``module`` with sharded tables).
    """
    if not get_gradient_division():
        raise ValueError(
            "torchrec gradient division is off (torchrec.distributed.comm_ops.set_gradient_division"
            "(False)); the loss scaling of global_mean_scale assumes it is on"
        )
    return DistributedModelParallel(module, device=device, plan=plan, sharders=list(sharders))


def build_optimizer(
    dmp: DistributedModelParallel,
    dense_optimizer: Callable[[List[torch.Tensor]], torch.optim.Optimizer],
) -> CombinedOptimizer:
    """One ``KeyedOptimizer`` over the fused table optimizer and a dense optimizer.

    Args:
        dmp: the sharded model.
        dense_optimizer: factory of the optimizer of the replicated parameters, e.g.
            ``lambda params: torch.optim.AdamW(params, lr=3e-3)``.

    Returns:
        ``CombinedOptimizer``: ``step()`` updates the dense part (the tables are updated in
        the backward); ``state_dict()`` is keyed by parameter names, table state sharded.
    """
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(dense_params, dense_optimizer)
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def global_mean_scale(local_count: int, device: torch.device) -> Tuple[float, int]:
    """Factor that turns a rank's mean loss into its loss under the gradient convention.

    ``W * local_count / global_count``: multiplied by it, a rank's mean over its
    ``local_count`` examples becomes ``W`` times its share of the global-batch mean, whose
    average over ranks (what DDP and torchrec's gradient division differentiate) is the
    global-batch mean. Collective: one all-reduce of an int64 scalar on every rank.

    Args:
        local_count: examples behind this rank's mean loss (e.g. supervised positions).
        device: device of the all-reduce tensor (``cuda`` under NCCL).

    Returns:
        ``(scale, global_count)``; ``(0.0, 0)`` when no rank has any example.
    """
    count = torch.tensor([local_count], dtype=torch.int64, device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world_size = dist.get_world_size()
    total = int(count.item())
    return (world_size * local_count / total if total > 0 else 0.0), total
