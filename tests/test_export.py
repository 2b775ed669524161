"""Tests for the inference form and its export (rl_mtd.export)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from rl_mtd import conv_pad
from rl_mtd.conv_pad import nchwc_block, pad_chains
from rl_mtd.data import MEAN, STD
from rl_mtd.decompose import DecomposedConv, FactorCache, conv_layers, rank_for_ratio
from rl_mtd.errors import RlMtdError
from rl_mtd.export import (
    cheapest_merge,
    composable,
    compose,
    inference_model,
    to_onnx,
    to_torchscript,
)
from rl_mtd.metrics import count_macs
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, apply_policy

WIDTH = 0.125
# One (method, layer reduction) per vgg11 conv: Tucker-2, CP and kept layers.
MIXED = [
    ("keep", 1),
    ("tucker2", 4),
    ("cp", 8),
    ("tucker2", 0.9),
    ("cp", 4),
    ("keep", 1),
    ("tucker2", 16),
    ("cp", 16),
]


def _randomise_batchnorms(model: nn.Module, gen: torch.Generator) -> None:
    """Running statistics and affine parameters far from the identity BatchNorm."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def compressed() -> nn.Module:
    """A width-0.125 VGG11 with a mixed policy applied and non-trivial BatchNorms (train mode)."""
    torch.manual_seed(0)
    model = build_vgg("vgg11", width=WIDTH)
    choices = [
        (method, rank_for_ratio(conv, method, ratio))
        for (_, conv), (method, ratio) in zip(conv_layers(model), MIXED)
    ]
    policy = Policy.from_choices(model, choices, net="vgg11", width=WIDTH)
    out = apply_policy(model, policy, cache=FactorCache())
    _randomise_batchnorms(out, torch.Generator().manual_seed(1))
    return out.train()


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    """Equal up to ``rtol`` of the output's scale."""
    scale = want.abs().max().item()
    assert scale > 0
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} for outputs of scale {scale:.3g}"


def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    with torch.no_grad():
        out = model.eval()(x)
    model.train(was)
    return out


# ----------------------------------------------------------------------------- inference_model


def test_inference_model_matches_eval_and_leaves_input_alone(compressed: nn.Module) -> None:
    before = {k: v.clone() for k, v in compressed.state_dict().items()}
    net = inference_model(compressed)
    assert compressed.training, "inference_model changed the input model's mode"
    for k, v in compressed.state_dict().items():
        assert torch.equal(v, before[k]), f"inference_model changed the input model ({k})"

    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got = net(x)
    _close(got, _eval_outputs(compressed, x))
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_inference_model_is_smaller(compressed: nn.Module) -> None:
    net = inference_model(compressed)
    kinds = {type(m) for m in net.modules()}
    assert nn.BatchNorm2d not in kinds and nn.Identity not in kinds
    assert len(list(net.modules())) < len(list(compressed.modules()))
    # Every layer under its original name, each block merged to at most three convs.
    names = [n for n, _ in conv_layers(build_vgg("vgg11", width=WIDTH))]
    layers = [net.get_submodule(n) for n in names]
    assert [type(m) for m in layers] == [type(compressed.get_submodule(n)) for n in names]
    assert all(len(m) <= 3 for m in layers if isinstance(m, DecomposedConv))
    # The near-full-rank Tucker-2 block (layer "reduction" 0.9) became one conv.
    assert len(layers[3]) == 1
    # A CP block's kx1 and 1xk depthwise convs become one kxk: 3 MACs more per rank and pixel,
    # a fraction of a percent of the whole; everything else only removes MACs.
    assert count_macs(net) <= 1.01 * count_macs(compressed)


def test_inference_model_without_merging_folds_only(compressed: nn.Module) -> None:
    net = inference_model(compressed, merge=False, channels_last=False)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in compressed.modules()
    )
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(net(x), _eval_outputs(compressed, x))


def test_dropout_removed_and_plain_vgg_folded() -> None:
    torch.manual_seed(0)
    model = build_vgg("vgg11", width=WIDTH)
    _randomise_batchnorms(model, torch.Generator().manual_seed(3))
    model.features.insert(3, nn.Dropout(0.5))
    net = inference_model(model)
    assert not any(isinstance(m, nn.Dropout | nn.BatchNorm2d) for m in net.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        _close(net(x), _eval_outputs(model, x))


# ----------------------------------------------------------------------------- merging rules


def _conv(cin: int, cout: int, k: tuple[int, int], pad: tuple[int, int], **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=pad, **kw).double()


@pytest.mark.parametrize(
    "chain",
    [
        # kx1 then 1xk depthwise (a CP block's middle) -> kxk depthwise
        lambda: [
            _conv(5, 5, (3, 1), (1, 0), groups=5, bias=False),
            _conv(5, 5, (1, 3), (0, 1), groups=5, bias=False),
        ],
        # 1x1 into the kxk after it (no bias on the 1x1), kxk with its bias into the 1x1 after it
        lambda: [_conv(6, 3, (1, 1), (0, 0), bias=False), _conv(3, 4, (3, 3), (1, 1))],
        lambda: [_conv(3, 4, (3, 3), (1, 1)), _conv(4, 7, (1, 1), (0, 0))],
        # strided core, then a 1x1
        lambda: [_conv(4, 2, (3, 3), (1, 1), stride=2, bias=False), _conv(2, 5, (1, 1), (0, 0))],
        # dense 1x1 then depthwise 5x5
        lambda: [_conv(3, 4, (1, 1), (0, 0), bias=False), _conv(4, 4, (5, 5), (2, 2), groups=4)],
    ],
)
def test_compose_is_exact(chain) -> None:
    torch.manual_seed(0)
    first, second = chain()
    assert composable(first, second)
    merged = compose(first, second)
    x = torch.randn(2, first.in_channels, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), second(first(x)))


def test_inexact_merges_refused() -> None:
    three = _conv(4, 4, (3, 3), (1, 1), bias=False)
    assert not composable(three, _conv(4, 4, (3, 3), (1, 1)))  # borders differ
    assert not composable(_conv(4, 4, (1, 1), (0, 0)), three)  # bias zero-padded at borders
    assert not composable(_conv(4, 4, (3, 1), (1, 0)), _conv(4, 4, (3, 1), (1, 0)))
    assert composable(_conv(4, 4, (1, 1), (0, 0), bias=False), three)


def test_cheapest_merge_keeps_low_rank_chains_factored() -> None:
    low = [
        _conv(64, 4, (1, 1), (0, 0), bias=False),
        _conv(4, 4, (3, 3), (1, 1), bias=False),
        _conv(4, 64, (1, 1), (0, 0)),
    ]
    assert [c.kernel_size for c in cheapest_merge(low)] == [(1, 1), (3, 3), (1, 1)]
    full = [
        _conv(16, 16, (1, 1), (0, 0), bias=False),
        _conv(16, 16, (3, 3), (1, 1), bias=False),
        _conv(16, 16, (1, 1), (0, 0)),
    ]
    assert [c.kernel_size for c in cheapest_merge(full)] == [(3, 3)]


# ----------------------------------------------------------------------------- export


def test_onnx_export_runs_in_onnxruntime(compressed: nn.Module, tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = to_onnx(compressed, tmp_path / "sub" / "model.onnx")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)  # exported at batch 1: the batch axis is dynamic
    (got,) = session.run(None, {"input": x.numpy()})
    _close(torch.from_numpy(got), _eval_outputs(compressed, x))
    # What the input must be travels with the file (a user without rl_mtd has only the file).
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["preprocessing"])["mean"] == list(MEAN)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_reloads(compressed: nn.Module, tmp_path) -> None:
    path = to_torchscript(compressed, tmp_path / "model.pt")
    extra = {"preprocessing.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["preprocessing.json"])["std"] == list(STD)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _close(loaded(x), _eval_outputs(compressed, x))


def _inner_channels(model: nn.Module) -> list[int]:
    """Channel counts between consecutive convs of the decomposed blocks."""
    return [
        block[i].out_channels
        for block in model.modules()
        if isinstance(block, DecomposedConv)
        for i in range(len(block) - 1)
    ]


@pytest.mark.parametrize("multiple", [8, 16])
def test_padded_chains_give_the_same_outputs_with_aligned_channels(
    compressed: nn.Module, multiple: int
) -> None:
    net = inference_model(compressed, channels_last=False)
    inner = _inner_channels(net)
    assert any(c % multiple for c in inner)  # something to pad (ranks like 3, 5 or 11)
    padded = inference_model(compressed, pad_channels=multiple)
    assert all(c % multiple == 0 for c in _inner_channels(padded))
    assert _inner_channels(padded) != inner
    blocks = [m for m in net.modules() if isinstance(m, DecomposedConv)]
    grown = [m for m in padded.modules() if isinstance(m, DecomposedConv)]
    for old, new in zip(blocks, grown, strict=True):  # what the rest of the net sees is kept
        assert (new[0].in_channels, new[-1].out_channels) == (
            old[0].in_channels,
            old[-1].out_channels,
        )
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _close(padded(x), _eval_outputs(compressed, x), rtol=1e-5)
    assert pad_chains(net, 1) is net and _inner_channels(net) == inner


def test_depthwise_chain_padded_through() -> None:
    """A CP chain: 1x1 to rank 5, depthwise 3x1 and 1x3 at rank 5, 1x1 back: every inner
    channel count grows, the depthwise convs stay depthwise, the output is unchanged."""
    torch.manual_seed(0)
    chain = nn.Sequential(
        nn.Conv2d(16, 5, 1, bias=False),
        nn.Conv2d(5, 5, (3, 1), padding=(1, 0), groups=5, bias=False),
        nn.Conv2d(5, 5, (1, 3), padding=(0, 1), groups=5, bias=True),
        nn.Conv2d(5, 24, 1),
    )
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        want = chain(x)
        padded = pad_chains(chain, 8)
        _close(padded(x), want, rtol=1e-6)
    assert [c.out_channels for c in padded] == [8, 8, 8, 24]
    assert [c.groups for c in padded] == [1, 8, 8, 1]
    with pytest.raises(ValueError, match="at least 1"):
        pad_chains(chain, 0)


@pytest.mark.parametrize(
    "machine, cpuinfo, want",
    [
        ("x86_64", "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n", 16),
        ("x86_64", "flags\t\t: fpu sse2 avx avx2 fma\n", 8),
        ("x86_64", None, 8),  # /proc/cpuinfo unreadable
        ("aarch64", "flags\t\t: avx512f\n", 8),  # not x86: not read at all
    ],
)
def test_nchwc_block_follows_the_cpu(monkeypatch, machine, cpuinfo, want) -> None:
    monkeypatch.setattr(conv_pad.platform, "machine", lambda: machine)

    def read_text(self, *args, **kwargs):
        if cpuinfo is None:
            raise OSError("no /proc here")
        return cpuinfo

    monkeypatch.setattr(conv_pad.Path, "read_text", read_text)
    assert nchwc_block() == want


def _dw(c: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, padding=1, groups=c, bias=bias)


@pytest.mark.parametrize(
    "layers, inner",
    [
        # a depthwise conv at either end is tied to the chain's edge: nothing next to it pads
        ([_dw(5), nn.Conv2d(5, 6, 1)], [5]),
        ([nn.Conv2d(16, 5, 1), _dw(5, bias=True)], [5]),
        ([nn.Conv2d(16, 5, 1), _dw(5), nn.Conv2d(5, 6, 1), nn.Conv2d(6, 4, 1)], [8, 8, 8]),
        # a grouped conv keeps its sizes, and the depthwise conv tied to it too
        ([nn.Conv2d(16, 6, 1), _dw(6), nn.Conv2d(6, 4, 1, groups=2)], [6, 6]),
        # reflect padding: an all-zero channel stays zero
        ([nn.Conv2d(16, 5, 3, padding=1, padding_mode="reflect"), nn.Conv2d(5, 3, 1)], [8]),
    ],
)
def test_padding_never_changes_a_chains_outer_sizes(layers, inner) -> None:
    torch.manual_seed(0)
    chain = nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(layers[-1].out_channels, 2, 1))
    x = torch.randn(2, layers[0].in_channels, 8, 8)
    with torch.no_grad():
        want = chain(x)
        pad_chains(chain, 8)
        _close(chain(x), want, rtol=1e-6)
    assert [c.out_channels for c in chain[: len(layers) - 1]] == inner
    assert chain[len(layers) - 1].out_channels == layers[-1].out_channels


def test_padding_keeps_flags_random_state_and_custom_convs() -> None:
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(16, 5, 1), nn.Conv2d(5, 6, 1), Doubled(6, 3, 1))
    chain[0].bias.requires_grad_(False)
    hooked = nn.Sequential(nn.Conv2d(16, 5, 1), nn.Conv2d(5, 3, 1))
    hooked[1].register_forward_hook(lambda m, i, o: o + 1)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        want, want_hooked = chain(x), hooked(x)
    state = torch.get_rng_state()
    pad_chains(chain, 8)
    pad_chains(hooked, 8)
    assert torch.equal(torch.get_rng_state(), state)  # no random initialisation drawn
    assert [c.out_channels for c in chain] == [8, 6, 3]  # the subclass keeps its sizes
    assert type(chain[2]) is Doubled and [c.out_channels for c in hooked] == [5, 3]
    assert chain[0].weight.requires_grad and not chain[0].bias.requires_grad
    with torch.no_grad():
        _close(chain(x), want, rtol=1e-6)
        _close(hooked(x), want_hooked, rtol=1e-6)


@pytest.mark.parametrize("multiple", [1, 16, None])
def test_onnx_export_with_any_padding_matches(
    compressed: nn.Module, tmp_path, multiple: int | None
) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = to_onnx(compressed, tmp_path / "model.onnx", pad_channels=multiple)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    _close(torch.from_numpy(got), _eval_outputs(compressed, x))
    # the file itself: its convs' weights have the padded channel counts
    weights = {t.name: list(t.dims) for t in onnx.load(str(path)).graph.initializer}
    outs = sorted(dims[0] for dims in weights.values() if len(dims) == 4)
    inner = _inner_channels(inference_model(compressed))
    block = nchwc_block() if multiple is None else multiple
    want = sorted([-(-c // block) * block for c in inner] + _outer_channels(compressed))
    assert outs == want


def _outer_channels(model: nn.Module) -> list[int]:
    """Output channels of the convs that end a block or stand alone, in the inference form."""
    net = inference_model(model)
    ends = [b[-1].out_channels for b in net.modules() if isinstance(b, DecomposedConv)]
    inside = {id(c) for b in net.modules() if isinstance(b, DecomposedConv) for c in b}
    alone = [
        m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d) and id(m) not in inside
    ]
    return ends + alone


def test_onnx_export_without_onnx_says_what_to_install(
    compressed: nn.Module, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(RlMtdError, match=r"pip install onnx"):
        to_onnx(compressed, tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_cuda_graphs_need_a_cuda_module():
    from rl_mtd.export import CudaGraphed

    with pytest.raises(RlMtdError, match="CUDA graphs need a module on a CUDA device"):
        CudaGraphed(build_vgg("vgg11", width=0.125))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_graphed_matches_the_module():
    from rl_mtd.export import CudaGraphed

    model = build_vgg("vgg11", width=0.125).cuda().eval()
    graphed = CudaGraphed(model)
    for batch in (1, 4, 1):
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(graphed(x), model(x), atol=1e-4, rtol=1e-4)
    assert len(graphed._graphs) == 2, "one graph per input shape"
