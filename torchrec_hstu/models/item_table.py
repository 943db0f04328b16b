"""The item-table side shared by the example models: an ``EmbeddingCollection`` that may stay
on another device (or be sharded by DMP) while the dense part runs elsewhere."""

from typing import Optional, Sequence, TypeVar, Union

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig

ModelT = TypeVar("ModelT", bound="ItemTableModel")


class ItemTableModel(nn.Module):
    """Base of the retrieval and ranking models: one item table, the rest "dense".

    A subclass calls :meth:`create_item_table` in its constructor; :meth:`embedding_device`,
    :meth:`dense_device` and :meth:`place` then say and set where each side lives (the GPU
    machine has no fbgemm CUDA ops, so the table stays on CPU while the dense part runs on CUDA).
    """

    table_name: str
    embedding_collection: nn.Module

    def create_item_table(
        self,
        num_items: int,
        embedding_dim: int,
        feature_names: Sequence[str],
        table_name: str,
        embedding_init_std: float,
        device: Optional[torch.device],
    ) -> None:
        """Create the item ``EmbeddingCollection`` (``num_items`` rows, normal init).

        Args:
            num_items: catalogue size (> 0).
            embedding_dim: the table's width.
            feature_names: the id features that read it.
            table_name: the table (not ``items``: that collides with ``nn.ModuleDict.items``).
            embedding_init_std: std of the normal init.
            device: device of the table.
        """
        if num_items <= 0:
            raise ValueError(f"num_items must be > 0; got {num_items}")
        if table_name == "items":
            raise ValueError("table_name must not be 'items' (collides with nn.ModuleDict.items)")
        self.table_name = table_name
        table = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=table_name,
                    embedding_dim=embedding_dim,
                    num_embeddings=num_items,
                    feature_names=list(feature_names),
                )
            ],
            device=device,
        )
        with torch.no_grad():
            weight = table.embeddings[table_name].weight
            if weight.device.type != "meta":
                weight.normal_(0.0, embedding_init_std)
        self.embedding_collection = table

    def embedding_device(self) -> torch.device:
        if not isinstance(self.embedding_collection, EmbeddingCollection):
            # Sharded by DMP: lookups take inputs on the rank's device, where the dense part
            # lives; a rank holding no shard of the table has an empty CPU placeholder weight.
            return self.dense_device()
        return self.embedding_collection.embeddings[self.table_name].weight.device

    def dense_device(self) -> torch.device:
        for child in self.children():
            if child is not self.embedding_collection:
                for parameter in child.parameters():
                    return parameter.device
        return self.embedding_device()

    def place(self: ModelT, dense_device: Union[str, torch.device]) -> ModelT:
        """Move every module except the item table to ``dense_device``."""
        for child in self.children():
            if child is not self.embedding_collection:
                child.to(dense_device)
        return self
