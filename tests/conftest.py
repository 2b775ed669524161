"""Fixtures shared by the whole suite: thread pinning, an isolated cache, tiny data and a model.

Everything here is small on purpose: a width-0.125 VGG11 on a few hundred synthetic images
trains in about a second on one core.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from rl_mtd.data import DataSplits, load_cifar10, make_splits
from rl_mtd.io import CACHE_ENV, DATA_ENV
from rl_mtd.metrics import count_macs
from rl_mtd.models import build_vgg
from rl_mtd.train import TrainConfig, train

TINY_NET, TINY_WIDTH = "vgg11", 0.125


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two spinning OpenMP threads make these tiny
    models 5-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def short_cp_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """CP-ALS capped at 50 sweeps, for tests of the command line and the benchmarks, not of the
    factors (their studies' CP fits were a third of their time); tests/test_factorize.py and
    test_decompose.py check CP uncapped."""
    from rl_mtd import factorize

    monkeypatch.setattr(factorize, "MAX_SWEEPS", 50)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Nothing goes to ~/.cache, and a user's $RL_MTD_DATA does not leak into a test; nor do the
    latency models an earlier test memoised in this process (they hold its timer)."""
    from agents.inputs import forget_latency_models

    forget_latency_models()
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv(DATA_ENV, raising=False)
    return cache


@pytest.fixture(scope="session")
def tiny_splits(tmp_path_factory: pytest.TempPathFactory) -> DataSplits:
    """600 train (200 of them held out as the proxy split) and 200 test synthetic images."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("splits_cache")))
        return make_splits(load_cifar10("synthetic:600,200"), proxy_size=200, seed=0)


@pytest.fixture(scope="session")
def tiny_baseline(tiny_splits: DataSplits) -> nn.Module:
    """A width-0.125 VGG11 trained for 2 epochs, so accuracies differ between policies.

    Shared by the whole session: tests must not change it (copy it first).
    """
    torch.manual_seed(0)
    model = build_vgg(TINY_NET, width=TINY_WIDTH)
    train(model, tiny_splits.train, config=TrainConfig(epochs=2, lr=0.05, seed=0))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_proxy(tiny_baseline: nn.Module, tiny_splits: DataSplits):
    """A proxy over ``tiny_baseline``, one per test module (its memo and counters are the
    module's), with a memory-only factor cache: it cannot use the per-test RL_MTD_CACHE."""
    from rl_mtd.decompose import FactorCache
    from rl_mtd.proxy import Proxy

    return Proxy(
        tiny_baseline,
        train_split=tiny_splits.train,
        proxy_split=tiny_splits.proxy,
        device="cpu",
        cache=FactorCache(),
    )


_REAL_DATA = os.environ.get(DATA_ENV)  # read before _isolated_cache hides it from the tests


@pytest.fixture(scope="session")
def real_archive() -> Path:
    """The real CIFAR-10 for tests that need it: ``$RL_MTD_DATA``, else ../shared/data; skipped
    with the reason when neither exists."""
    if _REAL_DATA and Path(_REAL_DATA).exists():
        return Path(_REAL_DATA)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if not shared.is_file():
        pytest.skip(f"real CIFAR-10 not found: set {DATA_ENV} or put it at {shared}")
    return shared


class FakeTimer:
    """Deterministic 'milliseconds': 1e-6 per MAC of the batch plus 0.02 per conv call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, shape: tuple[int, ...]) -> float:
        self.calls += 1
        convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
        return 1e-6 * shape[0] * count_macs(module, (1, *shape[1:])) + 0.02 * convs
