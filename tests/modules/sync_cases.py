"""The three models of the host-sync tests and their inputs (shared by the CPU and GPU tests).

Each case builds a model and its inputs on ``device`` up front (a torchrec ``JaggedTensor`` is
built from lengths: nothing is read), and exposes the two halves of a training step:

* ``edge()``: the model's edge check, the one host read per batch; returns the facts;
* ``step(facts)``: forward with those facts, a scalar loss, backward. Nothing in it may read
  the device (``torch.cuda.set_sync_debug_mode("error")`` on CUDA; host-read guards on CPU).
"""

import dataclasses
import os
from typing import Any, Callable, List

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.config import build_multi_channel, load_config
from torchrec_hstu.modules import (
    ContextualPreprocessor,
    HSTUPositionalEncoder,
    HSTUTransducer,
    STUStack,
)
from torchrec_hstu.ops.common import check_jagged_batch_sync
from torchrec_hstu.ops.jagged import lengths_to_offsets

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWO_CHANNEL_CONFIG = os.path.join(REPO, "examples", "configs", "ranking_two_channel.pbtxt")

D = 16
STU = dict(embedding_dim=D, num_heads=2, hidden_dim=8, attention_dim=8, output_dropout_ratio=0.0)


@dataclasses.dataclass
class SyncCase:
    name: str
    model: torch.nn.Module
    edge: Callable[[], Any]
    step: Callable[[Any], torch.Tensor]


def _lengths(values: List[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def stack_case(device: torch.device, kernel: str) -> SyncCase:
    """3 layers, truncation after layer 2 (tail 2), targets."""
    torch.manual_seed(0)
    stack = STUStack.uniform(STU, 3, attn_truncation_split_layer=2, attn_truncation_tail_len=2, kernel=kernel)
    stack = stack.to(device)
    lengths, targets = [7, 3, 0, 9], [2, 1, 0, 3]
    offsets = lengths_to_offsets(_lengths(lengths, device))
    num_targets = _lengths(targets, device)
    x = torch.randn(sum(lengths), D, device=device, requires_grad=True)
    max_seq_len = max(lengths)

    def edge():
        return check_jagged_batch_sync(offsets, x.shape[0], max_seq_len, num_targets)

    def step(facts):
        out = stack(x, offsets, max_seq_len, num_targets, batch_facts=facts)
        loss = out.x.float().square().mean()
        loss.backward()
        return loss

    return SyncCase("STUStack", stack, edge, step)


def transducer_case(device: torch.device, kernel: str) -> SyncCase:
    """Contextual preprocessor (2 tokens, actions), time encoding, truncation, full embeddings."""
    torch.manual_seed(0)
    pre = ContextualPreprocessor(
        12, D, 16, contextual_feature_dim=3, max_contextual_seq_len=2, action_embedding_dim=2, action_weights=[1, 2]
    )
    stack = STUStack.uniform(
        dict(STU, contextual_seq_len=-1), 3, contextual_seq_len=2, attn_truncation_split_layer=1,
        attn_truncation_tail_len=3, kernel=kernel,
    )
    transducer = HSTUTransducer(
        stack,
        input_preprocessor=pre,
        positional_encoder=HSTUPositionalEncoder(32, 16, D, contextual_seq_len=2),
        return_full_embeddings=True,
    ).to(device)
    lengths, targets = [6, 2, 0, 8], [2, 1, 0, 2]
    total = sum(lengths)
    jt = JaggedTensor(values=torch.randn(total, 12, device=device), lengths=_lengths(lengths, device))
    num_targets = _lengths(targets, device)
    timestamps = torch.arange(total, device=device, dtype=torch.int64) * 60
    actions = torch.randint(0, 4, (total,), device=device)
    contextual = torch.randn(len(lengths), 2, 3, device=device)

    def edge():
        return transducer.check_batch_sync(jt, num_targets=num_targets)

    def step(facts):
        out = transducer(
            jt, seq_timestamps=timestamps, num_targets=num_targets, contextual_embeddings=contextual,
            seq_actions=actions, batch_facts=facts,
        )
        loss = out.candidate_embeddings.values().float().sum() + out.full_embeddings.values().float().square().mean()
        loss.backward()
        return loss

    return SyncCase("HSTUTransducer", transducer, edge, step)


def two_channel_case(device: torch.device, kernel: str) -> SyncCase:
    """examples/configs/ranking_two_channel.pbtxt: clicks and views histories, shared candidates."""
    torch.manual_seed(0)
    model = build_multi_channel(load_config(TWO_CHANNEL_CONFIG), kernel=kernel).to(device)
    width = 32  # the config's item_embedding_dim
    hist = {"clicks": [3, 0, 5, 1], "views": [4, 2, 0, 6]}
    cands = [2, 1, 3, 1]
    emb = {
        name: JaggedTensor(values=torch.randn(sum(n), width, device=device), lengths=_lengths(n, device))
        for name, n in hist.items()
    }
    emb["candidates"] = JaggedTensor(values=torch.randn(sum(cands), width, device=device), lengths=_lengths(cands, device))
    stamps = {name: torch.arange(sum(n), device=device, dtype=torch.int64) * 60 for name, n in hist.items()}
    stamps["candidates"] = torch.full((sum(cands),), 10**6, device=device, dtype=torch.int64)
    actions = {name: torch.randint(0, 4, (sum(n),), device=device) for name, n in hist.items()}

    def edge():
        return model.check_batch_sync(emb)

    def step(facts):
        out = model(emb, seq_timestamps=stamps, seq_actions=actions, batch_facts=facts)
        loss = out.candidate_embeddings.values().float().square().mean()
        loss.backward()
        return loss

    return SyncCase("MultiChannelHSTU", model, edge, step)


CASES = (stack_case, transducer_case, two_channel_case)
