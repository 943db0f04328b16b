"""How the Triton launchers pick a kernel config without autotuning (short sequences): the
first candidate that compiles and fits the GPU, tried once per shape class (CPU: ``run`` is a
stand-in that raises what Triton raises when a config needs more shared memory than the GPU has).
"""

from typing import List

import pytest

pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402

from torchrec_hstu.ops.triton import hstu_attention  # noqa: E402
from torchrec_hstu.ops.triton.hstu_attention import (  # noqa: E402
    KernelConfig,
    choose_config,
    clear_config_cache,
    set_config,
)

CANDIDATES = [KernelConfig(0, 0, 8, 3), KernelConfig(0, 0, 8, 2), KernelConfig(0, 0, 8, 1)]
SHORT = 64  # below AUTOTUNE_MIN_SEQ_LEN: no timing, the fit check only


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_config_cache()
    yield
    clear_config_cache()


class FakeGPU:
    """``run(config)`` for a GPU on which the configs in ``too_big`` do not fit."""

    def __init__(self, too_big: List[KernelConfig]) -> None:
        self.too_big = too_big
        self.calls: List[KernelConfig] = []

    def __call__(self, config: KernelConfig) -> None:
        self.calls.append(config)
        if config in self.too_big:
            raise OutOfResources(262144, 101376, "shared memory")


def test_first_candidate_that_fits_is_taken_and_cached() -> None:
    gpu = FakeGPU(too_big=[CANDIDATES[0]])
    assert choose_config(("k",), CANDIDATES, SHORT, gpu) == CANDIDATES[1]
    assert gpu.calls == CANDIDATES[:2]
    # Same shape class again: no more trial launches.
    assert choose_config(("k",), CANDIDATES, SHORT, gpu) == CANDIDATES[1]
    assert gpu.calls == CANDIDATES[:2]


def test_where_the_first_fits_it_is_launched_once_to_check() -> None:
    gpu = FakeGPU(too_big=[])
    assert choose_config(("k",), CANDIDATES, SHORT, gpu) == CANDIDATES[0]
    assert gpu.calls == CANDIDATES[:1]


def test_last_candidate_is_returned_untried_so_its_error_surfaces() -> None:
    gpu = FakeGPU(too_big=CANDIDATES)
    assert choose_config(("k",), CANDIDATES, SHORT, gpu) == CANDIDATES[-1]
    assert gpu.calls == CANDIDATES[:-1]
    with pytest.raises(OutOfResources):
        gpu(CANDIDATES[-1])


def test_untuned_choice_does_not_stand_in_for_autotuning() -> None:
    # The short-sequence pick is cached apart from the shape class, which a long batch of the
    # same class still autotunes (or finds pinned).
    gpu = FakeGPU(too_big=[CANDIDATES[0]])
    choose_config(("k",), CANDIDATES, SHORT, gpu)
    set_config(("k",), CANDIDATES[2])
    assert choose_config(("k",), CANDIDATES, SHORT, gpu) == CANDIDATES[2]


def test_interpreter_takes_the_first_candidate_without_trials(monkeypatch) -> None:
    monkeypatch.setattr(hstu_attention, "interpret_mode", lambda: True)
    gpu = FakeGPU(too_big=[CANDIDATES[0]])
    assert choose_config(("k",), CANDIDATES, SHORT, gpu) == CANDIDATES[0]
    assert gpu.calls == []


def test_single_candidate_is_never_tried() -> None:
    gpu = FakeGPU(too_big=[CANDIDATES[0]])
    assert choose_config(("k",), CANDIDATES[:1], SHORT, gpu) == CANDIDATES[0]
    assert gpu.calls == []
