"""Tests for the conv decompositions (rl_mtd.decompose, rl_mtd.factorize) and the factor cache."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rl_mtd import factorize
from rl_mtd.decompose import (
    DecomposedConv,
    FactorCache,
    conv_layers,
    decompose_conv,
    decomposed_params,
    layer_params,
    next_rank,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.models import build_vgg


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _conv(
    cin: int,
    cout: int,
    *,
    k: int = 3,
    stride: int = 1,
    padding: int = 1,
    bias: bool = False,
    seed: int = 0,
) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    if bias:
        with torch.no_grad():
            conv.bias.normal_()
    return conv.eval()


def _exact_cp_kernel(shape: tuple[int, int, int, int], rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a, b, c, d = (torch.randn(n, rank, generator=g) for n in shape)
    return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("padding", [0, 1])
def test_full_rank_tucker2_reproduces_conv(stride: int, bias: bool, padding: int) -> None:
    conv = _conv(16, 24, stride=stride, padding=padding, bias=bias)
    block = decompose_conv(conv, "tucker2", (24, 16), cache=FactorCache())
    assert isinstance(block, DecomposedConv)
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, y_dec = conv(x), block(x)
    assert y_dec.shape == y.shape
    assert _rel(y_dec, y) < 1e-4
    # The block carries stride, padding and bias into its layers.
    core = list(block.children())[1]
    assert core.stride == (stride, stride) and core.padding == (padding, padding)
    assert (list(block.children())[-1].bias is not None) == bias


def _conv_with_kernel(w: torch.Tensor, stride: int = 1) -> nn.Conv2d:
    """A 3x3 conv (padding 1, random bias) holding kernel ``w``."""
    conv = nn.Conv2d(w.shape[1], w.shape[0], 3, stride=stride, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.normal_()
    return conv


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_cp_recovers_exact_low_rank_kernel(seed: int) -> None:
    w = _exact_cp_kernel((32, 16, 3, 3), 6, seed)
    f = factorize.cp(w, 6)
    assert factorize.relative_error(f.reconstruct(), w) < 1e-3

    conv = _conv_with_kernel(w)
    block = decompose_conv(conv, "cp", 6, cache=FactorCache())
    x = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(block(x), conv(x)) < 1e-3


@pytest.mark.parametrize("stride", [1, 2])
def test_cp_keeps_stride_padding_and_bias(stride: int) -> None:
    w = _exact_cp_kernel((12, 8, 3, 3), 4, seed=3)
    conv = _conv_with_kernel(w, stride=stride)
    block = decompose_conv(conv, "cp", 4, cache=FactorCache())
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y, y_dec = conv(x), block(x)
    assert y_dec.shape == y.shape
    assert _rel(y_dec, y) < 1e-3


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("method", ["tucker2", "cp"])
@pytest.mark.parametrize("cin,cout", [(64, 128), (256, 256), (128, 64)])
def test_rank_for_ratio_hits_the_budget(method: str, cin: int, cout: int) -> None:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False).to("meta")
    rank = rank_for_ratio(conv, method, 8)
    target = layer_params(conv) / 8
    got = decomposed_params(conv, method, rank)
    assert abs(got - target) <= 0.10 * target, (rank, got, target)


@pytest.mark.parametrize("level", [4.0, 8.0, 12.0])
def test_tucker2_meets_the_level_on_a_layer_with_three_inputs(level: float) -> None:
    """The first conv (3 inputs): in the out/in proportion the smallest Tucker-2 has 1.1x fewer
    parameters, so every level was that; below it the output rank goes down alone."""
    conv = nn.Conv2d(3, 64, 3, padding=1).to("meta")
    rank = rank_for_ratio(conv, "tucker2", level)
    ratio = layer_params(conv) / decomposed_params(conv, "tucker2", rank)
    assert level / 1.3 <= ratio <= level * 1.3, (rank, ratio)
    ranks, r = [rank], rank
    while (r := next_rank(conv, "tucker2", r)) is not None:  # settling can undo it step by step
        assert decomposed_params(conv, "tucker2", r) > decomposed_params(conv, "tucker2", ranks[-1])
        ranks.append(r)
    assert (21, 1) in ranks


@pytest.mark.parametrize("shape", [(1, 4), (4, 1)])
def test_cp_ranks_stop_at_what_a_1x1_kernel_can_use(shape) -> None:
    conv = nn.Conv2d(*shape, 1)
    assert rank_for_ratio(conv, "cp", 1.2) == 1
    assert next_rank(conv, "cp", 1) is None


def test_keep_follows_the_conv_s_dtype() -> None:
    conv = _conv(4, 6, bias=True).double()
    block = decompose_conv(conv, "keep", None)
    assert block.weight.dtype == torch.float64
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(block(x), conv(x))


@pytest.mark.parametrize(
    "method,rank",
    [("keep", None), ("tucker2", (12, 5)), ("tucker2", 7), ("cp", 9), ("cp", 1)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_decomposed_params_matches_module(method: str, rank, bias: bool) -> None:
    conv = _conv(10, 14, bias=bias)
    block = decompose_conv(conv, method, rank, cache=FactorCache())
    assert decomposed_params(conv, method, rank) == sum(p.numel() for p in block.parameters())


def test_keep_returns_an_independent_copy() -> None:
    conv = _conv(4, 6, bias=True)
    block = decompose_conv(conv, "keep", None)
    assert block is not conv
    assert torch.equal(block.weight, conv.weight) and torch.equal(block.bias, conv.bias)
    with torch.no_grad():
        block.weight.zero_()
    assert conv.weight.abs().sum() > 0


# ----------------------------------------------------------------------------- conv_layers


@pytest.mark.parametrize("net,count", [("vgg11", 8), ("vgg16", 13)])
def test_conv_layers_in_forward_order(net: str, count: int) -> None:
    model = build_vgg(net, width=0.125)
    convs = conv_layers(model)
    assert len(convs) == count
    # Forward order: each conv's input channels are the previous conv's outputs.
    assert convs[0][1].in_channels == 3
    for (_, prev), (_, nxt) in zip(convs, convs[1:]):
        assert nxt.in_channels == prev.out_channels
    indices = [int(name.split(".")[1]) for name, _ in convs]
    assert indices == sorted(indices)
    # The order of calls in a forward pass is the same.
    called: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [c.register_forward_hook(lambda m, i, o: called.append(names[m])) for _, c in convs]
    model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert called == [n for n, _ in convs]


def test_conv_layers_skips_inner_convs_of_decomposed_blocks() -> None:
    model = build_vgg("vgg11", width=0.125)
    convs = conv_layers(model)
    name1, conv1 = convs[1]
    name3, conv3 = convs[3]
    cache = FactorCache()
    model.features[int(name1.split(".")[1])] = decompose_conv(conv1, "tucker2", 4, cache=cache)
    model.features[int(name3.split(".")[1])] = decompose_conv(conv3, "cp", 5, cache=cache)
    after = conv_layers(model)
    # The decomposed layers are blocks now, not convs; their inner convs are not layers.
    assert [n for n, _ in after] == [n for n, _ in convs if n not in (name1, name3)]
    assert all(type(c) is nn.Conv2d for _, c in after)
    assert all(not n.startswith((f"{name1}.", f"{name3}.")) for n, _ in after)
    # Yet the inner convs are there and are Conv2d modules.
    inner = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(inner) == len(convs) - 2 + 3 + 4


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("method,rank", [("tucker2", (6, 4)), ("cp", 5)])
def test_factor_cache_memory_then_disk(tmp_path, method: str, rank) -> None:
    conv = _conv(8, 12, bias=True)
    cache = FactorCache(tmp_path / "factors")
    first = decompose_conv(conv, method, rank, cache=cache)
    assert (cache.misses, cache.hits, cache.disk_hits) == (1, 0, 0)
    assert list((tmp_path / "factors").rglob("*.pt")), "factors not written to disk"

    second = decompose_conv(conv, method, rank, cache=cache)
    assert (cache.misses, cache.hits, cache.disk_hits) == (1, 1, 0)

    fresh = FactorCache(tmp_path / "factors")
    third = decompose_conv(conv, method, rank, cache=fresh)
    assert (fresh.misses, fresh.hits, fresh.disk_hits) == (0, 0, 1)

    for other in (second, third):
        for (k, a), (_, b) in zip(first.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), k


def test_factor_cache_keys_on_weights_and_rank(tmp_path) -> None:
    conv = _conv(8, 12)
    cache = FactorCache(tmp_path / "factors")
    decompose_conv(conv, "cp", 5, cache=cache)
    decompose_conv(conv, "cp", 6, cache=cache)
    with torch.no_grad():
        conv.weight.mul_(2)
    decompose_conv(conv, "cp", 5, cache=cache)
    assert cache.misses == 3 and cache.hits == 0


def test_default_cache_uses_env_dir(tmp_path) -> None:
    conv = _conv(6, 6)
    decompose_conv(conv, "tucker2", 3)
    assert list((tmp_path / "cache").rglob("*.pt")), "default cache ignored RL_MTD_CACHE"


def test_corrupt_cache_file_is_recomputed(tmp_path) -> None:
    conv = _conv(8, 12)
    cache = FactorCache(tmp_path / "factors")
    good = decompose_conv(conv, "cp", 5, cache=cache)
    (path,) = list((tmp_path / "factors").rglob("*.pt"))
    path.write_bytes(b"not a torch file" * 4)

    fresh = FactorCache(tmp_path / "factors")
    again = decompose_conv(conv, "cp", 5, cache=fresh)
    assert (fresh.misses, fresh.disk_hits) == (1, 0)
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        assert torch.allclose(again(x), good(x), rtol=1e-5, atol=1e-6)
    # The recomputed factors replaced the corrupt file.
    assert FactorCache(tmp_path / "factors").get(path.stem) is not None


# ----------------------------------------------------------------------------- CP guards


def test_cp_factors_are_finite_and_balanced() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 16, 3, 3)
    f = factorize.cp(w, 10)
    mats = [f.out, f.inp, f.vertical, f.horizontal]
    assert all(torch.isfinite(m).all() for m in mats)
    norms = torch.stack([torch.linalg.vector_norm(m.double(), dim=0) for m in mats])  # (4, R)
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)


def test_cp_hard_case_stays_finite() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 64, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", factorize.DegenerateFactorsWarning)
        f = factorize.cp(w, 200)
    mats = [f.out, f.inp, f.vertical, f.horizontal]
    assert all(torch.isfinite(m).all() for m in mats)
    err = factorize.relative_error(f.reconstruct(), w)
    assert err < 1.0
    # No rank-one term may dwarf the kernel (the degeneracy check).
    term = torch.ones(200, dtype=torch.float64)
    for m in mats:
        term = term * torch.linalg.vector_norm(m.double(), dim=0)
    assert float(term.max()) <= factorize.DEGENERACY_RATIO * float(torch.linalg.vector_norm(w))


def test_cp_degeneracy_guard_refits_and_warns(monkeypatch) -> None:
    # With a zero threshold every fit counts as degenerate: the guard must walk its whole
    # escalation (stronger ridges, then the damped last resort) and still return finite,
    # balanced factors, with a warning.
    monkeypatch.setattr(factorize, "DEGENERACY_RATIO", 0.0)
    torch.manual_seed(3)
    w = torch.randn(16, 8, 3, 3)
    # The warning names the ridge of the fit actually returned: the last resort's 10.
    with pytest.warns(factorize.DegenerateFactorsWarning, match="degenerate.*ridge 10$"):
        f = factorize.cp(w, 6, max_iter=10)
    assert f.degenerate_fixed
    mats = [f.out, f.inp, f.vertical, f.horizontal]
    assert all(torch.isfinite(m).all() for m in mats)
    norms = torch.stack([torch.linalg.vector_norm(m.double(), dim=0) for m in mats])
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)


def test_tucker2_factors_are_orthonormal() -> None:
    torch.manual_seed(2)
    t = factorize.tucker2(torch.randn(20, 12, 3, 3), (8, 5))
    assert t.core.shape == (8, 5, 3, 3)
    eye_o = t.u_out.double().T @ t.u_out.double()
    eye_i = t.u_in.double().T @ t.u_in.double()
    assert torch.allclose(eye_o, torch.eye(8, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(eye_i, torch.eye(5, dtype=torch.float64), atol=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", ["tucker2", "cp"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise(method: str, bad: float) -> None:
    conv = _conv(6, 8)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = bad
    with pytest.raises(RlMtdError, match="NaN or inf"):
        decompose_conv(conv, method, 3, cache=FactorCache())


@pytest.mark.parametrize(
    "method,rank",
    [
        ("tucker2", 0),
        ("tucker2", (9, 2)),  # r_out > 8 outputs
        ("tucker2", (2, 7)),  # r_in > 6 inputs
        ("tucker2", (1, 2, 3)),
        ("tucker2", None),
        ("cp", 0),
        ("cp", -3),
        ("cp", 2.5),
        ("cp", (2, 2)),
        ("cp", None),
        ("cp", True),
        ("svd", 3),
        ("CP", 3),
    ],
)
def test_invalid_rank_or_method_raises(method: str, rank) -> None:
    conv = _conv(6, 8)
    with pytest.raises(RlMtdError):
        decompose_conv(conv, method, rank, cache=FactorCache())


@pytest.mark.parametrize("ratio", [0, -2, float("nan"), float("inf")])
def test_rank_for_ratio_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(RlMtdError, match="ratio"):
        rank_for_ratio(_conv(6, 8), "cp", ratio)


def test_unknown_method_message_names_choices() -> None:
    with pytest.raises(RlMtdError, match="tucker2"):
        rank_for_ratio(_conv(6, 8), "svd", 4)


@pytest.mark.parametrize(
    "payload",
    [
        {"foo": torch.zeros(3)},
        [1, 2],
        {
            "out": torch.zeros(12, 4),
            "inp": torch.zeros(8, 4),
            "vertical": torch.zeros(3, 4),
            "horizontal": torch.zeros(3, 4),
        },
        {
            "out": torch.full((12, 5), float("nan")),
            "inp": torch.zeros(8, 5),
            "vertical": torch.zeros(3, 5),
            "horizontal": torch.zeros(3, 5),
        },
    ],
    ids=["dict", "list", "wrong-rank", "nan"],
)
def test_foreign_but_loadable_cache_file_is_recomputed(tmp_path, payload) -> None:
    conv = _conv(8, 12)
    decompose_conv(conv, "cp", 5, cache=FactorCache(tmp_path / "factors"))
    (path,) = list((tmp_path / "factors").rglob("*.pt"))
    torch.save(payload, path)
    fresh = FactorCache(tmp_path / "factors")
    block = decompose_conv(conv, "cp", 5, cache=fresh)
    assert isinstance(block, DecomposedConv)
    assert fresh.misses == 1 and fresh.disk_hits == 0
    x = torch.randn(2, 8, 6, 6)
    clean = decompose_conv(conv, "cp", 5, cache=FactorCache())
    torch.testing.assert_close(block(x), clean(x))
    again = FactorCache(tmp_path / "factors")  # the bad file was overwritten with good factors
    decompose_conv(conv, "cp", 5, cache=again)
    assert again.disk_hits == 1 and again.misses == 0


def test_a_cp_rank_beyond_what_the_kernel_can_use_is_refused():
    """A hand-edited policy's CP rank of 1000 on an 8x3x3x3 kernel used to be accepted and then
    spent minutes building a 1000-channel block; an exact CP never needs more than 27 terms."""
    from rl_mtd.decompose import max_cp_rank, normalize_rank

    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert max_cp_rank(conv) == 27
    assert normalize_rank(conv, "cp", 27) == 27
    with pytest.raises(RlMtdError, match="never needs more than 27"):
        normalize_rank(conv, "cp", 28)
    assert max_cp_rank(nn.Conv2d(64, 128, 3)) == 64 * 128 * 9 // 128
