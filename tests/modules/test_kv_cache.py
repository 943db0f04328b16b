"""KV-cached STU inference: prefill + cached_forward against the full forward.

The oracle is the full forward of the same module on ``[prefix | delta]`` (itself checked
against the layer formula in ``test_stu.py``): its last ``d_b`` rows per sequence must equal
the delta step's outputs, exactly in float64 (to rounding), within bf16 tolerance in bf16, and
per FP8 mode against the FP8 emulation. Refusals (another batch, changed weights, masks the
cache cannot continue exactly) must raise ``ValueError``.
"""

import copy
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_hstu.modules import (
    ContextualPreprocessor,
    HSTUPositionalEncoder,
    HSTUTransducer,
    STULayer,
    STUStack,
)
from torchrec_hstu.modules.kv_cache import STULayerKVCache, prefill_transducer, score_candidates
from torchrec_hstu.ops.common import AttentionOptions
from torchrec_hstu.ops.fp8.emulation import fp8_hstu_attention_emulated
from torchrec_hstu.ops.hstu_compute import hstu_compute_output, hstu_compute_uqvk
from torchrec_hstu.ops.jagged import concat_2D_jagged, lengths_to_offsets


# ----------------------------------------------------------------------------- helpers
def offsets_of(lengths: List[int]) -> torch.Tensor:
    return lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))


def rows_at(lengths: List[int], firsts: List[int], counts: List[int]) -> torch.Tensor:
    """Indices of tokens ``firsts[b] .. firsts[b] + counts[b] - 1`` of each sequence."""
    starts = offsets_of(lengths)[:-1].tolist()
    parts = [torch.arange(s + f, s + f + c) for s, f, c in zip(starts, firsts, counts)]
    return torch.cat(parts + [torch.zeros(0, dtype=torch.int64)])


def last_rows(lengths: List[int], deltas: List[int]) -> torch.Tensor:
    return rows_at(lengths, [n - d for n, d in zip(lengths, deltas)], deltas)


def make_stack(num_layers: int = 3, dtype=torch.float64, seed: int = 0, split: Tuple[int, int] = (0, 0),
               kernel: str = "PYTORCH", **layer_kwargs) -> STUStack:
    torch.manual_seed(seed)
    kwargs = dict(embedding_dim=16, num_heads=2, hidden_dim=8, attention_dim=8, output_dropout_ratio=0.0)
    kwargs.update(layer_kwargs)
    stack = STUStack([STULayer(kernel=kernel, **kwargs) for _ in range(num_layers)], *split)
    with torch.no_grad():  # non-trivial norms and biases
        for layer in stack.layers:
            for p in (layer.uvqk_beta, layer.input_norm_bias, layer.output_norm_bias):
                p.uniform_(-0.3, 0.3)
            for p in (layer.input_norm_weight, layer.output_norm_weight):
                p.uniform_(0.5, 1.5)
    return stack.to(dtype).eval()


class Batch:
    """Prefix and delta embeddings of ``B`` sequences, with the concatenated full batch."""

    def __init__(self, prefixes: List[int], deltas: List[int], targets: Optional[List[int]], dtype, seed=0, dim=16):
        gen = torch.Generator().manual_seed(seed)
        self.prefixes, self.deltas, self.targets = prefixes, deltas, targets
        self.lengths = [p + d for p, d in zip(prefixes, deltas)]
        self.prefix_offsets, self.delta_offsets = offsets_of(prefixes), offsets_of(deltas)
        self.x_prefix = torch.randn(sum(prefixes), dim, generator=gen, dtype=torch.float64).to(dtype)
        self.x_delta = torch.randn(sum(deltas), dim, generator=gen, dtype=torch.float64).to(dtype)
        self.x_full = concat_2D_jagged(self.x_prefix, self.x_delta, self.prefix_offsets, self.delta_offsets)
        self.full_offsets = offsets_of(self.lengths)
        self.max_seq_len = max(self.lengths)
        self.num_targets = None if targets is None else torch.tensor(targets)


def full_and_cached(stack: STUStack, batch: Batch, max_seq_len: Optional[int] = None):
    max_seq_len = max_seq_len or batch.max_seq_len
    with torch.no_grad():
        full = stack(batch.x_full, batch.full_offsets, max_seq_len, batch.num_targets)
        _, cache = stack.prefill(batch.x_prefix, batch.prefix_offsets, max_seq_len)
        out, same = stack.cached_forward(
            batch.x_delta, cache, prefix_offsets=batch.prefix_offsets, delta_offsets=batch.delta_offsets,
            num_targets=batch.num_targets,
        )
    assert same is cache
    lengths = (full.x_offsets[1:] - full.x_offsets[:-1]).tolist()  # after truncation, if any
    return full.x[last_rows(lengths, batch.deltas)], out


# ----------------------------------------------------------------------------- exactness, float64
# (layer kwargs, stack truncation split, targets relative to deltas)
OPTION_CASES: Dict[str, Tuple[dict, Tuple[int, int], str]] = {
    "causal_targets": (dict(), (0, 0), "all"),
    "causal_history_and_targets": (dict(), (0, 0), "some"),
    "causal_history_only": (dict(), (0, 0), "none"),
    "contextual_window": (dict(contextual_seq_len=2, max_attn_len=3), (0, 0), "all"),
    "sla": (dict(sla_k1=3, sla_k2=2, contextual_seq_len=1), (0, 0), "some"),
    "fixed_scaling_group_norm": (dict(scaling_seqlen=30, use_group_norm=True), (0, 0), "some"),
    "not_target_aware": (dict(target_aware=False), (0, 0), "all"),
    "truncation": (dict(scaling_seqlen=25, contextual_seq_len=1), (2, 4), "all"),
    "uvqk_activation_all": (dict(uvqk_activation="all"), (0, 0), "some"),
}


def _targets(deltas: List[int], kind: str) -> Optional[List[int]]:
    if kind == "none":
        return None
    if kind == "all":
        return list(deltas)
    return [max(d - 2, 0) for d in deltas]


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_cached_equals_full_forward_float64(name):
    kwargs, split, kind = OPTION_CASES[name]
    prefixes, deltas = [6, 11, 2, 9], [3, 1, 4, 5]
    stack = make_stack(split=split, **kwargs)
    batch = Batch(prefixes, deltas, _targets(deltas, kind), torch.float64, seed=len(name))
    want, got = full_and_cached(stack, batch)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_several_candidate_sets_against_one_cache_and_uniform_delta():
    stack = make_stack(contextual_seq_len=1, max_attn_len=4)
    prefixes = [7, 3, 10]
    with torch.no_grad():
        _, cache = stack.prefill(Batch(prefixes, [0] * 3, None, torch.float64).x_prefix, offsets_of(prefixes), 14)
    for seed, delta in enumerate([1, 4, 2]):
        batch = Batch(prefixes, [delta] * 3, [delta] * 3, torch.float64, seed=seed)
        batch.x_prefix = Batch(prefixes, [0] * 3, None, torch.float64).x_prefix
        batch.x_full = concat_2D_jagged(batch.x_prefix, batch.x_delta, batch.prefix_offsets, batch.delta_offsets)
        with torch.no_grad():
            full = stack(batch.x_full, batch.full_offsets, 14, batch.num_targets).x
            # delta_offsets omitted: L' / B rows per sequence (generative-recommenders layout)
            out, _ = stack.cached_forward(batch.x_delta, cache, prefix_offsets=offsets_of(prefixes),
                                          num_targets=batch.num_targets)
        torch.testing.assert_close(out, full[last_rows(batch.lengths, batch.deltas)], rtol=1e-12, atol=1e-12)


def test_append_then_score_equals_full_forward():
    stack = make_stack(sla_k1=4, sla_k2=2)
    prefixes, chunk, cands = [5, 8, 0], [2, 3, 4], [3, 1, 2]
    gen = torch.Generator().manual_seed(5)
    xp, xc, xt = (torch.randn(sum(n), 16, generator=gen, dtype=torch.float64) for n in (prefixes, chunk, cands))
    po, co, to = offsets_of(prefixes), offsets_of(chunk), offsets_of(cands)
    history = concat_2D_jagged(xp, xc, po, co)
    ho = po + co
    full_x = concat_2D_jagged(history, xt, ho, to)
    lengths = [p + c + t for p, c, t in zip(prefixes, chunk, cands)]
    max_len = max(lengths)
    with torch.no_grad():
        full = stack(full_x, offsets_of(lengths), max_len, torch.tensor(cands)).x
        _, cache = stack.prefill(xp, po, max_len)
        appended_out, cache2 = stack.cached_forward(xc, cache, prefix_offsets=po, delta_offsets=co, append=True)
        scored, cache3 = stack.cached_forward(xt, cache2, prefix_offsets=ho, delta_offsets=to,
                                              num_targets=torch.tensor(cands))
    assert cache3 is cache2 and torch.equal(cache2.offsets, ho)
    chunk_rows = rows_at(lengths, prefixes, chunk)
    torch.testing.assert_close(appended_out, full[chunk_rows], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scored, full[last_rows(lengths, cands)], rtol=1e-12, atol=1e-12)
    # The old cache still serves the old prefix: caches are values.
    with pytest.raises(ValueError, match="another batch"):
        stack.cached_forward(xt, cache, prefix_offsets=ho, delta_offsets=to, num_targets=torch.tensor(cands))


def test_layer_level_api():
    stack = make_stack(num_layers=1, contextual_seq_len=2)
    layer = stack.layers[0]
    batch = Batch([4, 9], [3, 2], [3, 2], torch.float64)
    with torch.no_grad():
        full = layer(batch.x_full, batch.full_offsets, batch.max_seq_len, batch.num_targets)
        prefix_out, cache = layer.prefill(batch.x_prefix, batch.prefix_offsets, batch.max_seq_len)
        out, _ = layer.cached_forward(batch.x_delta, cache, prefix_offsets=batch.prefix_offsets,
                                      delta_offsets=batch.delta_offsets, num_targets=batch.num_targets)
    assert isinstance(cache, STULayerKVCache) and cache.k.shape == (13, 2, 8)
    torch.testing.assert_close(out, full[last_rows(batch.lengths, batch.deltas)], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prefix_out, full[rows_at(batch.lengths, [0, 0], batch.prefixes)],
                               rtol=1e-12, atol=1e-12)


def test_target_permutation_equivariance_in_cached_path():
    stack = make_stack(contextual_seq_len=1, max_attn_len=5)
    batch = Batch([6, 9, 4], [4, 3, 5], [4, 3, 5], torch.float64, seed=3)
    # a permutation of each sequence's candidates
    perm = torch.cat([torch.randperm(d, generator=torch.Generator().manual_seed(b)) + s
                      for b, (d, s) in enumerate(zip(batch.deltas, batch.delta_offsets[:-1].tolist()))])
    with torch.no_grad():
        _, cache = stack.prefill(batch.x_prefix, batch.prefix_offsets, batch.max_seq_len)
        kwargs = dict(prefix_offsets=batch.prefix_offsets, delta_offsets=batch.delta_offsets,
                      num_targets=batch.num_targets)
        out, _ = stack.cached_forward(batch.x_delta, cache, **kwargs)
        out_perm, _ = stack.cached_forward(batch.x_delta[perm], cache, **kwargs)
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[perm], out)  # the permutation is not trivial


# ----------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("kwargs", [dict(), dict(contextual_seq_len=2, max_attn_len=6), dict(sla_k1=5, sla_k2=3)])
def test_cached_close_to_full_forward_bf16(kwargs):
    stack = make_stack(dtype=torch.bfloat16, **kwargs)
    batch = Batch([20, 35, 7], [6, 4, 9], [6, 4, 9], torch.bfloat16, seed=2)
    want, got = full_and_cached(stack, batch)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=5e-3 * float(want.abs().max()), rtol=1e-2)


# ----------------------------------------------------------------------------- FP8
def test_fp8_mode0_cached_equals_full_forward():
    stack = make_stack(dtype=torch.float32, fp8_quant_mode=0, contextual_seq_len=1)
    batch = Batch([20, 33, 4], [6, 17, 9], [6, 17, 9], torch.float32, seed=4)
    want, got = full_and_cached(stack, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("mode", range(1, 6))
def test_fp8_single_layer_matches_emulation(mode):
    """Prefixes of 128/256 tokens (multiples of the default 128-row q block): the delta rule's
    quantization groups are those of the full emulation with the prefix queries zeroed."""
    stack = make_stack(num_layers=1, dtype=torch.float32, fp8_quant_mode=mode, contextual_seq_len=1)
    layer = stack.layers[0]
    cfg = layer.config
    prefixes, deltas = [128, 256, 128], [20, 7, 33]
    batch = Batch(prefixes, deltas, list(deltas), torch.float32, seed=mode)
    with torch.no_grad():
        _, cache = layer.prefill(batch.x_prefix, batch.prefix_offsets, batch.max_seq_len)
        got, _ = layer.cached_forward(batch.x_delta, cache, prefix_offsets=batch.prefix_offsets,
                                      delta_offsets=batch.delta_offsets, num_targets=batch.num_targets)
        # oracle: full-sequence projections, prefix queries zeroed, full FP8 emulation, delta rows
        u, q, k, v = hstu_compute_uqvk(batch.x_full, layer.input_norm_weight, layer.input_norm_bias, 1e-6,
                                       cfg.num_heads, cfg.attention_dim, cfg.hidden_dim, layer.uvqk_weight,
                                       layer.uvqk_beta)
        rows = last_rows(batch.lengths, deltas)
        q_zero = torch.zeros_like(q)
        q_zero[rows] = q[rows]
        attn = fp8_hstu_attention_emulated(q_zero, k, v, batch.full_offsets, batch.max_seq_len, cfg.alpha,
                                           layer.attention_options, batch.num_targets)
        want = hstu_compute_output(attn[rows].reshape(rows.numel(), -1), u[rows], batch.x_full[rows],
                                   layer.output_norm_weight, layer.output_norm_bias, 1e-6, layer.output_weight,
                                   cfg.num_heads, cfg.hidden_dim, 0.0, False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("mode", range(1, 6))
def test_fp8_stack_cached_close_to_full_fp8_forward(mode):
    """Multi-layer FP8 (modes 1..5): prefill quantizes over the prefix only, so deeper layers see
    slightly different prefix states than the full forward; both stay within FP8 error of the
    high-precision forward and of each other."""
    stack = make_stack(dtype=torch.float32, fp8_quant_mode=mode)
    batch = Batch([40, 23, 60], [8, 20, 5], [8, 20, 5], torch.float32, seed=10 + mode)
    want, got = full_and_cached(stack, batch)
    hp = copy.deepcopy(stack)
    for layer in hp.layers:
        layer.attention_options = AttentionOptions(**{**layer.attention_options.__dict__, "fp8_quant_mode": -1})
    with torch.no_grad():
        exact = hp(batch.x_full, batch.full_offsets, batch.max_seq_len, batch.num_targets).x
    exact = exact[last_rows(batch.lengths, batch.deltas)]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # Measured (3 seeds x modes 1..5): rel(got, want) 0.007-0.025, rel(., exact) 0.010-0.021 for both.
    fp8_error = rel(want, exact)
    assert rel(got, want) < 2 * fp8_error, (rel(got, want), fp8_error)
    assert rel(got, exact) < 1.5 * fp8_error, (rel(got, exact), fp8_error)


# ----------------------------------------------------------------------------- refusals
def _prefilled(stack=None, prefixes=(4, 6), max_seq_len=12, **kwargs):
    stack = stack or make_stack(num_layers=2)
    batch = Batch(list(prefixes), [2] * len(prefixes), [2] * len(prefixes), torch.float64)
    with torch.no_grad():
        _, cache = stack.prefill(batch.x_prefix, batch.prefix_offsets, max_seq_len, **kwargs)
    return stack, batch, cache


def test_cache_of_another_batch_raises():
    stack, batch, cache = _prefilled()
    other = offsets_of([6, 4])  # same B and total, other lengths
    with pytest.raises(ValueError, match="another batch"):
        stack.cached_forward(batch.x_delta, cache, prefix_offsets=other, num_targets=batch.num_targets)
    with pytest.raises(ValueError, match="another batch"):
        stack.cached_forward(batch.x_delta[:2], cache, prefix_offsets=offsets_of([4]),
                             num_targets=torch.tensor([2]))


def test_batch_key_is_checked():
    stack, batch, cache = _prefilled(batch_key=torch.tensor([101, 102]))
    kwargs = dict(prefix_offsets=batch.prefix_offsets, num_targets=batch.num_targets)
    with torch.no_grad():
        stack.cached_forward(batch.x_delta, cache, batch_key=torch.tensor([101, 102]), **kwargs)
    with pytest.raises(ValueError, match="another batch"):
        stack.cached_forward(batch.x_delta, cache, batch_key=torch.tensor([101, 999]), **kwargs)
    with pytest.raises(ValueError, match="batch_key must be given"):
        stack.cached_forward(batch.x_delta, cache, **kwargs)


def test_stale_weights_options_and_modules_raise():
    stack, batch, cache = _prefilled()
    kwargs = dict(prefix_offsets=batch.prefix_offsets, num_targets=batch.num_targets)
    with pytest.raises(ValueError, match="another STUStack"):
        make_stack(num_layers=2).cached_forward(batch.x_delta, cache, **kwargs)
    with torch.no_grad():
        stack.layers[1].output_weight.mul_(1.0)  # an in-place update (optimizer step)
    with pytest.raises(ValueError, match="parameters changed since prefill"):
        stack.cached_forward(batch.x_delta, cache, **kwargs)
    stack, batch, cache = _prefilled()
    stack.layers[0].attention_options = AttentionOptions(max_attn_len=2)
    with pytest.raises(ValueError, match="options changed since prefill"):
        stack.cached_forward(batch.x_delta, cache, **kwargs)


def test_longer_than_prefilled_max_seq_len_raises():
    stack, batch, cache = _prefilled(max_seq_len=7)
    with pytest.raises(ValueError, match="prefilled with max_seq_len=7"):
        stack.cached_forward(batch.x_delta, cache, prefix_offsets=batch.prefix_offsets, num_targets=batch.num_targets)


@pytest.mark.parametrize(
    "stack_kwargs, step, match",
    [
        (dict(causal=False), "prefill", "causal"),
        (dict(contextual_seq_len=1), "history", "exact only under causal masks"),
        (dict(contextual_seq_len=1), "append", "append=True is exact only under causal masks"),
        (dict(), "append_targets", "num_targets=None"),
        (dict(), "targets_in_prefix", "targets inside the cached prefix"),
        (dict(scaling_seqlen=-1, split=(1, 3)), "prefill", "fixed scaling_seqlen"),
        (dict(scaling_seqlen=20, split=(1, 3)), "append", "attention truncation"),
    ],
)
def test_inexact_steps_are_refused(stack_kwargs, step, match):
    stack_kwargs = dict(stack_kwargs)
    split = stack_kwargs.pop("split", (0, 0))
    stack = make_stack(num_layers=2, split=split, **stack_kwargs)
    batch = Batch([4, 6], [2, 2], [2, 2], torch.float64)
    with pytest.raises(ValueError, match=match):
        with torch.no_grad():
            _, cache = stack.prefill(batch.x_prefix, batch.prefix_offsets, 12)
            kwargs = dict(prefix_offsets=batch.prefix_offsets)
            if step == "history":
                stack.cached_forward(batch.x_delta, cache, num_targets=torch.tensor([1, 2]), **kwargs)
            elif step == "append":
                stack.cached_forward(batch.x_delta, cache, append=True, **kwargs)
            elif step == "append_targets":
                stack.cached_forward(batch.x_delta, cache, append=True, num_targets=batch.num_targets, **kwargs)
            elif step == "targets_in_prefix":
                stack.cached_forward(batch.x_delta, cache, num_targets=torch.tensor([3, 2]), **kwargs)


# ----------------------------------------------------------------------------- transducer
def make_transducer(contextual: int = 2) -> HSTUTransducer:
    torch.manual_seed(0)
    pre = ContextualPreprocessor(8, 16, 32, contextual_feature_dim=4, max_contextual_seq_len=contextual,
                                 action_embedding_dim=4, action_weights=[1, 2])
    pos = HSTUPositionalEncoder(64, 16, 16, contextual_seq_len=contextual)
    stack = STUStack([STULayer(16, 2, 8, 8, output_dropout_ratio=0.0, contextual_seq_len=contextual)
                      for _ in range(2)])
    return HSTUTransducer(stack, input_preprocessor=pre, positional_encoder=pos).eval()


def test_transducer_prefill_and_score_equal_full_forward():
    model = make_transducer()
    gen = torch.Generator().manual_seed(1)
    hist = [5, 0, 9]
    ho = offsets_of(hist)
    hx = torch.randn(sum(hist), 8, generator=gen)
    hts = torch.cumsum(torch.randint(1, 5000, (sum(hist),), generator=gen), 0).float()
    ha = torch.randint(0, 4, (sum(hist),), generator=gen)
    ctx = torch.randn(3, 2, 4, generator=gen)
    request_time = torch.tensor([1e6, 2e6, 3e6])
    max_len = 9 + 6
    with torch.no_grad():
        cache = prefill_transducer(model, JaggedTensor(values=hx, lengths=torch.tensor(hist)), max_len,
                                   seq_timestamps=hts, query_timestamps=request_time,
                                   contextual_embeddings=ctx, seq_actions=ha, batch_key=torch.tensor([7, 8, 9]))
    for cands in ([3, 2, 4], [1, 6, 0]):
        to = offsets_of(cands)
        tx = torch.randn(sum(cands), 8, generator=gen)
        tts = request_time.repeat_interleave(torch.tensor(cands))
        ta = torch.randint(0, 4, (sum(cands),), generator=gen)
        full_lengths = torch.tensor([h + t for h, t in zip(hist, cands)])
        with torch.no_grad():
            want = model(
                JaggedTensor(values=concat_2D_jagged(hx, tx, ho, to), lengths=full_lengths),
                seq_timestamps=concat_2D_jagged(hts, tts, ho, to), num_targets=torch.tensor(cands),
                contextual_embeddings=ctx, seq_actions=concat_2D_jagged(ha, ta, ho, to), max_seq_len=max_len,
            ).candidate_embeddings
            got = score_candidates(model, JaggedTensor(values=tx, lengths=torch.tensor(cands)), cache,
                                   history_offsets=ho, candidate_timestamps=tts, candidate_actions=ta,
                                   batch_key=torch.tensor([7, 8, 9]))
        assert torch.equal(got.lengths(), want.lengths())
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="request time"):
        score_candidates(model, JaggedTensor(values=tx, lengths=torch.tensor(cands)), cache, history_offsets=ho,
                         candidate_timestamps=tts + 60, candidate_actions=ta, batch_key=torch.tensor([7, 8, 9]))
    with pytest.raises(ValueError, match="another batch"):
        score_candidates(model, JaggedTensor(values=tx, lengths=torch.tensor(cands)), cache,
                         history_offsets=offsets_of([9, 0, 5]), candidate_timestamps=tts, candidate_actions=ta,
                         batch_key=torch.tensor([7, 8, 9]))
    with pytest.raises(ValueError, match="another HSTUTransducer"):
        score_candidates(make_transducer(), JaggedTensor(values=tx, lengths=torch.tensor(cands)), cache,
                         history_offsets=ho, candidate_timestamps=tts, candidate_actions=ta)


def test_transducer_without_time_needs_no_timestamps():
    stack = make_stack(num_layers=2, dtype=torch.float32)
    model = HSTUTransducer(stack, positional_encoder=HSTUPositionalEncoder(32, 8, 16, use_time_encoding=False)).eval()
    hist, cands = [4, 7], [2, 3]
    gen = torch.Generator().manual_seed(2)
    hx, tx = torch.randn(11, 16, generator=gen), torch.randn(5, 16, generator=gen)
    with torch.no_grad():
        want = model(JaggedTensor(values=concat_2D_jagged(hx, tx, offsets_of(hist), offsets_of(cands)),
                                  lengths=torch.tensor([6, 10])), num_targets=torch.tensor(cands)).candidate_embeddings
        cache = prefill_transducer(model, JaggedTensor(values=hx, lengths=torch.tensor(hist)), max_seq_len=10)
        got = score_candidates(model, JaggedTensor(values=tx, lengths=torch.tensor(cands)), cache,
                               history_offsets=offsets_of(hist))
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- device
@pytest.mark.gpu
@pytest.mark.parametrize("fp8_quant_mode", [-1, 0])
def test_triton_stack_cached_on_device(fp8_quant_mode):
    device = torch.device("cuda")
    stack = make_stack(dtype=torch.float32, kernel="TRITON", embedding_dim=64, num_heads=2, hidden_dim=64,
                       attention_dim=64, fp8_quant_mode=fp8_quant_mode).to(device).to(torch.bfloat16)
    batch = Batch([300, 1000, 17], [64, 64, 64], [64, 64, 64], torch.bfloat16, dim=64)
    for name in ("x_prefix", "x_delta", "x_full", "prefix_offsets", "delta_offsets", "full_offsets", "num_targets"):
        setattr(batch, name, getattr(batch, name).to(device))
    want, got = full_and_cached(stack, batch)
    rel = float((got.float() - want.float()).norm() / want.float().norm())
    assert rel < 1e-2, rel
