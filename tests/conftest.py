import importlib.util
import os
from types import ModuleType

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs on 2 CPU cores: keep hypothesis example counts modest and deterministic.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "gpu",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One intra-op thread for every test: the tests run many tiny ops, for which extra threads only
# add barrier waits, and `make test` runs `-n 2` workers on 2 cores (2 threads per worker
# oversubscribed the cores: small FP8 fwd+bwd measured 30x slower, one models test 88 s vs 1 s).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a fresh module object (not registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples", f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def retrieval() -> ModuleType:
    """``examples/train_retrieval.py``, loaded once per test module."""
    return load_example("train_retrieval")
