"""The backend table: each row's capabilities are listed, and a request outside them is refused
naming the capability (explicit kernels) or skipped (AUTO)."""

import dataclasses

import pytest
import torch

from torchrec_hstu.ops import backends
from torchrec_hstu.ops.backends import AttentionRequest, BackendCapabilities, missing_capability, select_backend
from torchrec_hstu.ops.common import AttentionOptions, HSTUKernel

BASE = dict(dtype=torch.bfloat16, device_type="cuda", head_dim_qk=64, head_dim_v=64, options=AttentionOptions())


def request(**overrides) -> AttentionRequest:
    return AttentionRequest(**{**BASE, **overrides})


#: capability field -> (a value that lacks it, a request that needs it, words in the refusal)
CASES = {
    "dtypes": (frozenset({torch.float16}), request(), "dtype bfloat16"),
    "devices": (frozenset({"cpu"}), request(), "tensors on cuda"),
    "head_dims": (frozenset({128}), request(), "head dim Dqk=64"),
    "max_head_dim": (32, request(), "head dim Dqk=64"),
    "equal_head_dims": (True, request(head_dim_v=32), "different q/k and v head dims"),
    "non_causal": (False, request(options=AttentionOptions(causal=False)), "causal=False"),
    "targets": (False, request(has_targets=True), "num_targets"),
    "contextual": (False, request(options=AttentionOptions(contextual_seq_len=2)), "contextual_seq_len=2"),
    "window": (False, request(options=AttentionOptions(max_attn_len=8)), "max_attn_len=8"),
    "window_with_targets_or_contextual": (
        False, request(options=AttentionOptions(max_attn_len=8), has_targets=True), "a window"),
    "non_causal_with_targets_or_contextual": (
        False, request(options=AttentionOptions(causal=False), has_targets=True), "causal=False together"),
    "sla": (False, request(options=AttentionOptions(sla_k1=4)), "Semi-Local Attention"),
    "min_full_attn_seq_len": (
        False, request(options=AttentionOptions(max_attn_len=8, min_full_attn_seq_len=2)), "min_full_attn_seq_len=2"),
    "scaling_seqlen": (False, request(scaling_seqlen_differs=True), "scaling_seqlen"),
    "dropout": (False, request(dropout=True), "attention dropout"),
    "backward": (False, request(needs_grad=True), "a backward pass"),
    "fp8_forward_modes": (frozenset({5}), request(options=AttentionOptions(fp8_quant_mode=2)), "fp8_quant_mode=2"),
    "fp8_min_head_dim": (128, request(options=AttentionOptions(fp8_quant_mode=2)), "FP8 with head dims below 128"),
    "delta": (False, request(delta=True), "delta (KV-cached) queries"),
    "delta_fp8_modes": (frozenset(), request(delta=True, options=AttentionOptions(fp8_quant_mode=1)),
                        "delta (KV-cached) queries with fp8_quant_mode=1"),
    "delta_backward": (False, request(delta=True, needs_grad=True), "gradients through delta"),
}
#: Declared for the docs and the forward-only refusal at backward time (run_attention), not a
#: request-time refusal; and export, which every row declares.
NOT_REQUEST_TIME = {"fp8_backward_modes", "export"}

EVERYTHING = BackendCapabilities(
    dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
    devices=frozenset({"cuda", "cpu"}),
    dropout=True,
    fp8_forward_modes=frozenset(range(6)),
    fp8_backward_modes=frozenset(range(6)),
    delta=True,
    delta_fp8_modes=frozenset(range(6)),
    delta_backward=True,
)


def test_every_capability_field_is_checked():
    fields = {f.name for f in dataclasses.fields(BackendCapabilities)}
    assert fields == set(CASES) | NOT_REQUEST_TIME


@pytest.mark.parametrize("field", sorted(CASES))
def test_a_request_outside_a_capability_names_it(field):
    lacking, needs, words = CASES[field]
    assert missing_capability(EVERYTHING, needs, check_device=True) is None
    caps = dataclasses.replace(EVERYTHING, **{field: lacking})
    problem = missing_capability(caps, needs, check_device=True)
    assert problem is not None and words in problem, problem


def test_each_row_lists_its_capabilities():
    table = backends.describe_backends()
    assert set(table) == {"PYTORCH", "TRITON", "CUTLASS_LEGACY", "CUTLASS_FORK", "CUTLASS_FBGEMM"}
    for name, row in backends.BACKENDS.items():
        assert row.name == name
        for field in dataclasses.fields(BackendCapabilities):
            assert f"{field.name}=" in table[name]
    assert backends.BACKENDS["PYTORCH"].capabilities.dropout
    assert not backends.BACKENDS["CUTLASS_FBGEMM"].capabilities.sla
    assert backends.BACKENDS["CUTLASS_FBGEMM"].capabilities.fp8_backward_modes == frozenset()


@pytest.mark.parametrize("field", ["dropout", "min_full_attn_seq_len", "window_with_targets_or_contextual"])
def test_explicit_kernel_lacking_a_capability_is_refused_and_auto_moves_on(monkeypatch, field):
    """TRITON (importable here) with one capability taken away: explicit TRITON raises naming
    it; AUTO passes it over for the next row that can (PYTORCH), never swapping an explicit
    choice."""
    lacking, needs, words = CASES[field]
    row = backends.BACKENDS["TRITON"]
    caps = dataclasses.replace(row.capabilities, devices=frozenset({"cuda", "cpu"}), **{field: lacking})
    monkeypatch.setitem(backends.BACKENDS, "TRITON", dataclasses.replace(row, capabilities=caps, is_available=lambda: True))
    cpu_needs = dataclasses.replace(needs, device_type="cpu")
    with pytest.raises(ValueError, match=f"kernel=TRITON .*cannot run {words}"):
        select_backend(HSTUKernel.TRITON, cpu_needs)
    assert select_backend("AUTO", cpu_needs).name == "PYTORCH"
    plain = request(device_type="cpu")
    assert select_backend("AUTO", plain).name == "TRITON"  # the row still serves what it can


def test_cutlass_without_a_wheel_is_a_runtime_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "hstu", None)
    monkeypatch.setitem(sys.modules, "fbgemm_gpu.experimental.hstu", None)
    with pytest.raises(RuntimeError, match="needs a CUTLASS HSTU wheel"):
        select_backend("CUTLASS", request())


def _hstu_wheel_that_runs(init_source: str, monkeypatch, tmp_path):
    """An ``hstu`` package whose ``__init__`` runs ``init_source`` placed on the path (FBGEMM's
    wheel absent), with the CUTLASS lookup's memory of earlier imports cleared; returns
    :mod:`torchrec_hstu.ops.cutlass`."""
    import sys

    from torchrec_hstu.ops import cutlass

    package = tmp_path / "hstu"
    package.mkdir()
    (package / "__init__.py").write_text(init_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hstu", raising=False)
    monkeypatch.setitem(sys.modules, "fbgemm_gpu.experimental.hstu", None)
    monkeypatch.setattr(cutlass, "_MISSING", set())
    monkeypatch.setattr(cutlass, "_LOAD_ERRORS", {})
    return cutlass


def test_cutlass_wheel_that_does_not_load_is_unavailable_and_named(monkeypatch, tmp_path):
    """An installed wheel whose library fails to load (a CUDA 12 build without libcudart.so.12
    on the loader's path raises OSError from dlopen) is not available: AUTO passes it by,
    kernel=CUTLASS refuses with the load error, no traceback from inside the import."""
    cutlass = _hstu_wheel_that_runs(
        "raise OSError('libcudart.so.12: cannot open shared object file: No such file or directory')\n",
        monkeypatch, tmp_path)
    assert not cutlass.cutlass_available()
    assert cutlass.cutlass_wheel_load_errors() == {
        "hstu": "OSError: libcudart.so.12: cannot open shared object file: No such file or directory"}
    with pytest.raises(RuntimeError, match=r"hstu is installed but does not load \(OSError: libcudart.so.12"):
        select_backend("CUTLASS", request())
    assert select_backend("AUTO", request(device_type="cpu")).name == "PYTORCH"


def test_cutlass_wheel_missing_a_dependency_is_a_load_error(monkeypatch, tmp_path):
    """A wheel module that imports but lacks one of its own dependencies is installed and broken
    (named in the refusal); one whose package is absent is simply not there."""
    # "hst": absent, and a prefix of the wheel's own name (not a package above it).
    cutlass = _hstu_wheel_that_runs("import hst\n", monkeypatch, tmp_path)
    assert not cutlass.cutlass_available()
    errors = cutlass.cutlass_wheel_load_errors()
    assert list(errors) == ["hstu"] and "No module named 'hst'" in errors["hstu"]
