"""After the edge check, the models read nothing from the device (CPU stand-in of the GPU test).

On CPU a host sync cannot be observed, so this test guards the ways Python code reads a tensor
value: ``Tensor.item / tolist / cpu / numpy / __bool__ / __int__ / __index__ / __float__``,
when called from ``torchrec_hstu`` code other than the PYTORCH reference kernel
(``ops/pytorch/``, which groups sequences by length on the host by design; the GPU test runs
TRITON). Without facts the same forward reads exactly once, in the edge check.
"""

import sys
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import pytest
import torch

from tests.modules.sync_cases import CASES

PACKAGE = "torchrec_hstu"
ALLOWED = ("torchrec_hstu/ops/pytorch/",)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__")


@contextmanager
def recorded_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[Tuple[str, str, int]]]:
    """Record ``(method, file, line)`` of every value read made by package code."""
    reads: List[Tuple[str, str, int]] = []

    def guard(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename.replace("\\", "/")
            if f"/{PACKAGE}/" in path and not any(part in path for part in ALLOWED):
                reads.append((name, path.split(f"/{PACKAGE}/", 1)[1], caller.f_lineno))
            return original(self, *args, **kwargs)

        return read

    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        yield reads


@pytest.mark.parametrize("make_case", CASES, ids=lambda make: make.__name__)
def test_no_host_read_after_the_edge_check(make_case, monkeypatch):
    case = make_case(torch.device("cpu"), "PYTORCH")
    facts = case.edge()
    assert facts is not None
    with recorded_host_reads(monkeypatch) as reads:
        loss = case.step(facts)
    assert not reads, f"{case.name} read the device after the edge check: {reads}"
    assert torch.isfinite(loss)


@pytest.mark.parametrize("make_case", CASES, ids=lambda make: make.__name__)
def test_without_facts_the_forward_reads_once_at_the_edge(make_case, monkeypatch):
    case = make_case(torch.device("cpu"), "PYTORCH")
    with recorded_host_reads(monkeypatch) as reads:
        case.step(None)
    assert [(name, path) for name, path, _ in reads] == [("tolist", "ops/common.py")], reads
