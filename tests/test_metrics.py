"""Tests for parameter/MAC counting and latency (rl_mtd.metrics)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from rl_mtd.decompose import FactorCache, conv_layers, decompose_conv
from rl_mtd.metrics import count_macs, count_params, macs_by_layer, measure_latency
from rl_mtd.models import CFGS, build_vgg, scaled_channels


def _analytic(net: str, width: float = 1.0, num_classes: int = 10) -> tuple[int, int]:
    """(params, MACs) of a CIFAR VGG from its cfg: 3x3 convs without bias, BN, linear head."""
    params = macs = 0
    cin, size = 3, 32
    for v in CFGS[net]:
        if v == "M":
            size //= 2
            continue
        cout = scaled_channels(int(v), width)
        params += cout * cin * 9 + 2 * cout  # conv weight + BN affine
        macs += cout * cin * 9 * size * size
        cin = cout
    params += cin * num_classes + num_classes
    macs += cin * num_classes
    return params, macs


def test_vgg16_macs_reference() -> None:
    macs = count_macs(build_vgg("vgg16"))
    assert macs == pytest.approx(313.2e6, rel=0.005)


@pytest.mark.parametrize("net", ["vgg11", "vgg13", "vgg16", "vgg19"])
@pytest.mark.parametrize("width", [0.125, 0.25])
def test_counts_match_cfg(net: str, width: float) -> None:
    model = build_vgg(net, width=width)
    params, macs = _analytic(net, width)
    assert count_params(model) == params
    assert count_macs(model) == macs


def test_vgg11_full_width_params() -> None:
    params, _ = _analytic("vgg11")
    assert count_params(build_vgg("vgg11")) == params == 9_228_362  # no conv biases


@pytest.fixture
def decomposed():
    """A width-0.125 vgg11 with conv 2 Tucker-2'd and conv 4 CP'd."""
    torch.manual_seed(0)
    model = build_vgg("vgg11", width=0.125)
    convs = conv_layers(model)
    cache = FactorCache()
    plan = {2: ("tucker2", (8, 6)), 4: ("cp", 10)}
    for idx, (method, rank) in plan.items():
        name, conv = convs[idx]
        model.features[int(name.split(".")[1])] = decompose_conv(conv, method, rank, cache=cache)
    return model, convs, plan


def test_decomposed_params_analytic(decomposed) -> None:
    model, convs, _ = decomposed
    base, _ = _analytic("vgg11", 0.125)
    # conv 2: 16 -> 32 (Tucker-2 ranks r_out 8, r_in 6); conv 4: 32 -> 64 (CP rank 10).
    assert (convs[2][1].in_channels, convs[2][1].out_channels) == (16, 32)
    assert (convs[4][1].in_channels, convs[4][1].out_channels) == (32, 64)
    tucker = 16 * 6 + 6 * 8 * 9 + 8 * 32
    cp = 10 * (32 + 3 + 3 + 64)
    expected = base - 32 * 16 * 9 + tucker - 64 * 32 * 9 + cp
    assert count_params(model) == expected


def test_decomposed_layers_have_fewer_macs(decomposed) -> None:
    model, convs, plan = decomposed
    base = macs_by_layer(build_vgg("vgg11", width=0.125))
    after = macs_by_layer(model)
    assert sum(after.values()) == count_macs(model) < count_macs(build_vgg("vgg11", width=0.125))
    for idx, (method, _) in plan.items():
        name, conv = convs[idx]
        inner = {k: v for k, v in after.items() if k.startswith(name + ".")}
        assert len(inner) == (3 if method == "tucker2" else 4)
        assert 0 < sum(inner.values()) < base[name]
    # Conv 2 runs at 8x8, conv 4 at 4x4 (stride 1, padding 1).
    name2, name4 = convs[2][0], convs[4][0]
    t2 = sum(v for k, v in after.items() if k.startswith(name2 + "."))
    assert t2 == 8 * 8 * (16 * 6 + 6 * 8 * 9 + 8 * 32)
    c4 = sum(v for k, v in after.items() if k.startswith(name4 + "."))
    assert c4 == 4 * 4 * (32 * 10 + 10 * 3 + 10 * 3 + 10 * 64)


@pytest.mark.parametrize("net", ["vgg11", "vgg16"])
def test_macs_by_layer_forward_order(net: str) -> None:
    model = build_vgg(net, width=0.125)
    macs = macs_by_layer(model)
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert list(macs) == expected
    assert list(macs)[-1] == "classifier"
    assert sum(macs.values()) == count_macs(model)
    assert all(v > 0 for v in macs.values())


def test_macs_by_layer_forward_order_decomposed(decomposed) -> None:
    model, _, _ = decomposed
    macs = macs_by_layer(model)
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert list(macs) == expected
    assert sum(macs.values()) == count_macs(model)


def test_macs_scale_with_batch_free_input_shape() -> None:
    model = build_vgg("vgg11", width=0.125)
    # MACs are for one image: the batch size in input_shape does not change them.
    assert macs_by_layer(model, (4, 3, 32, 32)) == macs_by_layer(model)


def test_macs_of_a_double_model_and_its_mode_after_a_failed_count() -> None:
    model = build_vgg("vgg11", width=0.125)
    macs = count_macs(model)
    assert count_macs(model.double()) == macs
    model.train()
    with pytest.raises(RuntimeError):
        count_macs(model, (1, 5, 32, 32))  # five input channels: the forward fails
    assert model.training


def test_counting_keeps_training_mode() -> None:
    model = build_vgg("vgg11", width=0.125).train()
    count_macs(model)
    assert model.training


class _Sleepy(nn.Module):
    """Takes a known wall time per forward pass and counts its calls."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_measure_latency_times_each_forward_pass_in_ms() -> None:
    model = _Sleepy(0.004)
    stats = measure_latency(model, warmup=2, repeats=5, batch_size=3)
    assert model.calls == 2 + 5, "warm-up passes plus the timed repeats"
    assert 4.0 <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["median_ms"] < 200, "milliseconds per pass, not the total of all passes"
    assert stats["batch_size"] == 3 and stats["repeats"] == 5


class _Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[tuple[int, ...], bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        self.seen.append((tuple(x.shape), cl))
        return x


def test_measure_latency_times_one_layer_on_its_own_input_shape() -> None:
    model = _Shapes()
    measure_latency(model, warmup=1, repeats=2, batch_size=4, in_channels=16, input_size=8)
    assert model.seen == [((4, 16, 8, 8), False)] * 3
    model = _Shapes()
    measure_latency(model, warmup=0, repeats=1, in_channels=16, input_size=8, channels_last=True)
    assert model.seen == [((1, 16, 8, 8), True)], "channels_last input when asked"
