"""Serve an HSTU model with a KV cache: encode each user's history once, score many candidate sets.

A request batch of ``--users`` users, each with ``--history`` past item ids and a request time,
is encoded once (``prefill_transducer``); then ``--sets`` candidate sets of ``--candidates``
items per user are scored against that cache (``score_candidates``). Every set is also scored
by recomputing the full sequence (``HSTUTransducer`` on ``history ++ candidates``), which is what
serving without a cache does; the script checks both give the same scores and reports latency.

Model: torchrec ``EmbeddingCollection`` (item ids -> embeddings) -> ``HSTUTransducer``
(contextual preprocessor with action encoding, positional + time encoder, ``--layers`` STU
layers) -> candidate embeddings -> a linear scoring head. Weights are random: this shows the
serving path and its cost, not a trained model.

Usage::

    .venv/bin/python examples/serve_cached.py                        # CPU, small
    python examples/serve_cached.py --device cuda --kernel TRITON --dtype bfloat16 \\
        --users 32 --history 4096 --candidates 128 --sets 8
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from examples.common import device_description, resolve_device  # noqa: E402
from torchrec_hstu.modules import ContextualPreprocessor, HSTUPositionalEncoder, HSTUTransducer, STUStack  # noqa: E402
from torchrec_hstu.modules.kv_cache import prefill_transducer, score_candidates  # noqa: E402
from torchrec_hstu.ops.jagged import concat_2D_jagged, lengths_to_offsets  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(args.seed)
    table = EmbeddingCollection(
        tables=[EmbeddingConfig(name="item_table", embedding_dim=args.item_dim, num_embeddings=args.num_items,
                                feature_names=["item"])],
        device=device,
    )
    contextual = args.contextual_tokens
    stu = dict(embedding_dim=args.dim, num_heads=args.heads, hidden_dim=args.head_dim, attention_dim=args.head_dim,
               output_dropout_ratio=0.0, fp8_quant_mode=args.fp8_quant_mode)
    transducer = HSTUTransducer(
        STUStack.uniform(stu, args.layers, contextual_seq_len=contextual, kernel=args.kernel),
        input_preprocessor=ContextualPreprocessor(
            args.item_dim, args.dim, 2 * args.dim, contextual_feature_dim=8 if contextual else 0,
            max_contextual_seq_len=contextual, action_embedding_dim=8, action_weights=[1, 2, 4],
        ),
        positional_encoder=HSTUPositionalEncoder(args.history + args.candidates + 1, 128, args.dim,
                                                 contextual_seq_len=contextual),
    )
    head = nn.Linear(args.dim, 1)
    dtype = DTYPES[args.dtype]
    return table.eval(), transducer.to(device=device, dtype=dtype).eval(), head.to(device=device, dtype=dtype).eval()


def embed(table: EmbeddingCollection, ids: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype) -> JaggedTensor:
    kjt = KeyedJaggedTensor(keys=["item"], values=ids, lengths=lengths)
    jt = table(kjt)["item"]
    return JaggedTensor(values=jt.values().to(dtype), lengths=lengths)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", default="AUTO", help="PYTORCH, TRITON or AUTO (TRITON on CUDA)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default float32 (CPU), bfloat16 (CUDA)")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--history", type=int, default=1024, help="history items per user")
    parser.add_argument("--candidates", type=int, default=64, help="candidates per user per set")
    parser.add_argument("--sets", type=int, default=4, help="candidate sets scored per user")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--item-dim", type=int, default=64)
    parser.add_argument("--num-items", type=int, default=100_000)
    parser.add_argument("--contextual-tokens", type=int, default=2)
    parser.add_argument("--fp8-quant-mode", type=int, default=-1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[args.dtype]
    table, model, head = build_model(args, device)
    gen = torch.Generator().manual_seed(args.seed + 1)

    users, hist, cands = args.users, args.history, args.candidates
    hist_lengths = torch.full((users,), hist, dtype=torch.int64, device=device)
    cand_lengths = torch.full((users,), cands, dtype=torch.int64, device=device)
    ho, co = lengths_to_offsets(hist_lengths), lengths_to_offsets(cand_lengths)
    hist_ids = torch.randint(0, args.num_items, (users * hist,), generator=gen).to(device)
    hist_actions = torch.randint(0, 8, (users * hist,), generator=gen).to(device)
    hist_times = torch.sort(torch.randint(0, 10**7, (users, hist), generator=gen), dim=1).values
    request_time = hist_times[:, -1] + 30
    hist_times = hist_times.reshape(-1).to(device, torch.float32)
    request_time = request_time.to(device, torch.float32)
    contextual = torch.randn(users, args.contextual_tokens, 8, generator=gen).to(device, dtype)
    max_seq_len = hist + cands

    timings: Dict[str, List[float]] = {"prefill": [], "cached": [], "full": []}
    max_diff = 0.0
    with torch.inference_mode():
        history = embed(table, hist_ids, hist_lengths, dtype)
        for _ in range(2):  # the first prefill warms up (allocator, kernel compilation), the second is timed
            synchronize(device)
            start = time.perf_counter()
            cache = prefill_transducer(model, history, max_seq_len, seq_timestamps=hist_times,
                                       query_timestamps=request_time, contextual_embeddings=contextual,
                                       seq_actions=hist_actions)
            synchronize(device)
        timings["prefill"].append((time.perf_counter() - start) * 1e3)
        for set_index in range(args.sets + 1):  # set 0 warms up, not timed
            cand_ids = torch.randint(0, args.num_items, (users * cands,), generator=gen).to(device)
            candidates = embed(table, cand_ids, cand_lengths, dtype)
            cand_times = request_time.repeat_interleave(cand_lengths)
            cand_actions = torch.zeros_like(cand_ids)

            synchronize(device)
            start = time.perf_counter()
            out = score_candidates(model, candidates, cache, history_offsets=ho, candidate_timestamps=cand_times,
                                   candidate_actions=cand_actions)
            cached_scores = head(out.values()).squeeze(-1)
            synchronize(device)
            cached_ms = (time.perf_counter() - start) * 1e3

            start = time.perf_counter()
            full_in = JaggedTensor(values=concat_2D_jagged(history.values(), candidates.values(), ho, co),
                                   lengths=hist_lengths + cand_lengths)
            full = model(full_in, seq_timestamps=concat_2D_jagged(hist_times, cand_times, ho, co),
                         num_targets=cand_lengths, contextual_embeddings=contextual,
                         seq_actions=concat_2D_jagged(hist_actions, cand_actions, ho, co), max_seq_len=max_seq_len)
            full_scores = head(full.candidate_embeddings.values()).squeeze(-1)
            synchronize(device)
            full_ms = (time.perf_counter() - start) * 1e3
            max_diff = max(max_diff, float((cached_scores.float() - full_scores.float()).abs().max()))
            if set_index > 0:
                timings["cached"].append(cached_ms)
                timings["full"].append(full_ms)

    cached = statistics.median(timings["cached"])
    full = statistics.median(timings["full"])
    prefill = timings["prefill"][0]
    total_cached = prefill + sum(timings["cached"])
    total_full = sum(timings["full"])
    print(f"device: {device_description(device)}; kernel {args.kernel}; dtype {args.dtype}; "
          f"fp8_quant_mode {args.fp8_quant_mode}")
    print(f"{users} users x {hist} history items; {args.sets} sets x {cands} candidates per user; "
          f"{args.layers} STU layers, d={args.dim}")
    print(f"  prefill (once)            {prefill:10.2f} ms")
    print(f"  score one set, cached     {cached:10.2f} ms  (median)")
    print(f"  score one set, full       {full:10.2f} ms  (median)  -> {full / cached:.1f}x")
    print(f"  all {args.sets} sets: prefill + cached {total_cached:.1f} ms vs full {total_full:.1f} ms "
          f"-> {total_full / total_cached:.2f}x")
    print(f"  max |cached score - full score| = {max_diff:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device_description(device), "timings_ms": timings,
                       "max_abs_score_diff": max_diff}, f, indent=1)


if __name__ == "__main__":
    main()
