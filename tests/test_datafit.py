"""Tests for data-aware factors (rl_mtd.datafit): output error, bit-identity without data, the
cache keys, input moment collection, apply_policy and the proxy with ``fit="data"``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rl_mtd import factorize
from rl_mtd.datafit import whitening
from rl_mtd.decompose import (
    FactorCache,
    collect_input_moments,
    compute_factors,
    conv_layers,
    decompose_conv,
    get_factors,
    input_moment,
    rank_for_ratio,
    weight_key,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy, apply_policy
from rl_mtd.proxy import Proxy, ProxyConfig

NET, WIDTH = "vgg11", 0.125


def _conv(cin: int = 32, cout: int = 48, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, padding=1, bias=True).eval()


def _correlated(n: int, seed: int, mix: torch.Tensor, noise: float = 0.01) -> torch.Tensor:
    """Inputs of (nearly) low rank across channels: ``mix`` (C, k) applied to k latent maps."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mix.shape[1], 8, 8, generator=g)
    x = torch.einsum("ck,nkhw->nchw", mix, z)
    return x + noise * torch.randn(x.shape, generator=g)


def _out_err(block: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = conv(x)
        return float(torch.linalg.vector_norm(block(x) - y) / torch.linalg.vector_norm(y))


# ----------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_data_aware_fit_halves_held_out_output_error(method: str) -> None:
    conv = _conv()
    mix = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))  # 4 latent channels
    fit_x, held_out = _correlated(64, 2, mix), _correlated(64, 3, mix)
    rank = rank_for_ratio(conv, method, 4.0)
    weights = decompose_conv(conv, method, rank, cache=FactorCache())
    data = decompose_conv(conv, method, rank, cache=FactorCache(), inputs=fit_x)
    err_w, err_d = _out_err(weights, conv, held_out), _out_err(data, conv, held_out)
    assert err_d <= 0.5 * err_w, (err_w, err_d)
    # The moment alone gives the same block as the activations it came from.
    again = decompose_conv(
        conv, method, rank, cache=FactorCache(), input_moment=input_moment(fit_x)
    )
    for a, b in zip(data.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in data.parameters())


def test_whitened_tucker2_minimises_the_weighted_kernel_error() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 16, 3, 3, generator=g, dtype=torch.float64)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    m = a @ a.T / 16
    s, s_inv = whitening(m, 16)
    assert torch.allclose(s @ s_inv, torch.eye(16, dtype=torch.float64), atol=1e-10)

    def weighted(t: factorize.TuckerFactors) -> float:
        return float(
            torch.linalg.vector_norm(torch.einsum("oihw,ji->ojhw", t.reconstruct() - w, s))
        )

    plain = factorize.tucker2(w, (8, 6))
    aware = factorize.tucker2(w, (8, 6), input_moment=m)
    assert weighted(aware) < weighted(plain)
    assert factorize.relative_error(plain.reconstruct(), w) < factorize.relative_error(
        aware.reconstruct(), w
    )
    # A moment proportional to the identity changes nothing but rounding.
    iso = factorize.tucker2(w, (8, 6), input_moment=3.0 * torch.eye(16, dtype=torch.float64))
    assert torch.allclose(iso.reconstruct(), plain.reconstruct(), atol=1e-10)


def test_without_data_the_fit_is_bit_identical() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 16, 3, 3, generator=g)
    t0, t1 = factorize.tucker2(w, (8, 6)), factorize.tucker2(w, (8, 6), input_moment=None)
    for name in ("core", "u_out", "u_in"):
        assert torch.equal(getattr(t0, name), getattr(t1, name))
    c0, c1 = factorize.cp(w, 12), factorize.cp(w, 12, input_moment=None)
    for name in ("out", "inp", "vertical", "horizontal"):
        assert torch.equal(getattr(c0, name), getattr(c1, name))
    conv = _conv(16, 24)
    for method, rank in (("tucker2", (8, 6)), ("cp", 12)):
        block = decompose_conv(conv, method, rank, cache=FactorCache())
        again = decompose_conv(conv, method, rank, cache=FactorCache(), inputs=None)
        direct = compute_factors(conv.weight.detach(), method, rank)
        first = next(iter(block.children())).weight
        key = "u_in" if method == "tucker2" else "inp"
        assert torch.equal(first, direct[key].T[:, :, None, None])
        for a, b in zip(block.state_dict().values(), again.state_dict().values()):
            assert torch.equal(a, b)


def test_bad_moments_are_refused() -> None:
    conv = _conv(16, 24)
    with pytest.raises(RlMtdError, match="16 input channels"):
        decompose_conv(conv, "tucker2", 4, cache=FactorCache(), input_moment=torch.eye(8))
    with pytest.raises(RlMtdError, match="NaN"):
        decompose_conv(conv, "cp", 4, cache=FactorCache(), input_moment=torch.full((16, 16), 1e400))
    with pytest.raises(RlMtdError, match="not both"):
        x = torch.randn(2, 16, 4, 4)
        decompose_conv(conv, "cp", 4, inputs=x, input_moment=input_moment(x))
    with pytest.raises(RlMtdError, match=r"\(N, C, H, W\)"):
        input_moment(torch.randn(16, 16))
    # An all-zero moment (dead inputs) falls back to the weight-only fit.
    zero = factorize.tucker2(conv.weight, (8, 6), input_moment=torch.zeros(16, 16))
    plain = factorize.tucker2(conv.weight, (8, 6))
    assert torch.allclose(zero.reconstruct(), plain.reconstruct(), atol=1e-6)


# ----------------------------------------------------------------------------- the cache


def test_cache_tells_the_two_fits_apart(tmp_path) -> None:
    conv = _conv(16, 24)
    x = torch.randn(8, 16, 6, 6)
    m = input_moment(x)
    cache = FactorCache(tmp_path)
    wkey = weight_key(conv.weight)
    # Weight-only keys are as before, so caches written by earlier versions stay valid.
    assert FactorCache.key(wkey, "tucker2", (8, 6)) == f"{wkey}-tucker2-8x6"
    assert FactorCache.key(wkey, "tucker2", (8, 6), "abc") == f"{wkey}-tucker2-8x6-dabc"

    plain = get_factors(conv, "tucker2", (8, 6), cache=cache)
    aware = get_factors(conv, "tucker2", (8, 6), cache=cache, input_moment=m)
    assert cache.misses == 2 and cache.hits == 0
    assert len(list(tmp_path.rglob("*.pt"))) == 2
    assert not torch.equal(plain["u_in"], aware["u_in"])

    same = get_factors(conv, "tucker2", (8, 6), cache=cache, input_moment=m.clone())
    assert cache.hits == 1 and torch.equal(same["u_in"], aware["u_in"])
    assert torch.equal(get_factors(conv, "tucker2", (8, 6), cache=cache)["u_in"], plain["u_in"])
    assert cache.hits == 2 and cache.misses == 2

    fresh = FactorCache(tmp_path)  # another process: the entries come from disk
    disk = get_factors(conv, "tucker2", (8, 6), cache=fresh, input_moment=input_moment(x))
    assert fresh.disk_hits == 1 and fresh.misses == 0
    assert torch.equal(disk["u_in"], aware["u_in"])
    other = get_factors(conv, "tucker2", (8, 6), cache=fresh, input_moment=2 * m)
    assert fresh.misses == 1 and not torch.equal(other["u_in"], aware["u_in"])


# ----------------------------------------------------------------------------- collecting


def test_collect_input_moments(tiny_baseline, tiny_splits) -> None:
    model = copy.deepcopy(tiny_baseline).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moments = collect_input_moments(model, tiny_splits.train, images=48, batch_size=32)
    convs = conv_layers(model)
    assert list(moments) == [name for name, _ in convs]
    for name, conv in convs:
        m = moments[name]
        assert m.shape == (conv.in_channels, conv.in_channels) and m.dtype == torch.float64
        assert torch.allclose(m, m.T) and float(torch.linalg.eigvalsh(m).min()) > -1e-9
    assert model.training  # mode restored; eval mode left the BatchNorm statistics alone
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(m._forward_pre_hooks for m in model.modules())

    # From batches of normalised images: the first conv sees the images themselves.
    x = torch.randn(10, 3, 32, 32)
    from_batches = collect_input_moments(model, [(x[:6], None), x[6:]], images=8)
    assert torch.allclose(from_batches[convs[0][0]], input_moment(x[:8]))
    with pytest.raises(RlMtdError, match="no images"):
        collect_input_moments(model, [])


def _policy(model: nn.Module) -> Policy:
    convs = conv_layers(model)
    choices = [("keep", None)] + [
        (method, rank_for_ratio(conv, method, 4.0))
        for (_, conv), method in zip(convs[1:], ["tucker2", "cp"] * len(convs))
    ]
    return Policy.from_choices(model, choices, net=NET, width=WIDTH)


def test_apply_policy_with_input_moments(tiny_baseline, tiny_splits) -> None:
    moments = collect_input_moments(tiny_baseline, tiny_splits.train, images=64, batch_size=32)
    policy = _policy(tiny_baseline)
    cache = FactorCache()
    plain = apply_policy(tiny_baseline, policy, cache=cache)
    aware = apply_policy(tiny_baseline, policy, cache=cache, input_moments=moments)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out_p, out_a = plain.eval()(x), aware.eval()(x)
    assert torch.isfinite(out_a).all() and out_a.shape == (4, 10)
    assert not torch.equal(out_p, out_a)
    # Only the layers named in input_moments get the data fit.
    name = conv_layers(tiny_baseline)[2][0]
    one = apply_policy(tiny_baseline, policy, cache=cache, input_moments={name: moments[name]})
    for n, _ in conv_layers(tiny_baseline)[1:]:
        same_as = aware if n == name else plain
        for a, b in zip(one.get_submodule(n).parameters(), same_as.get_submodule(n).parameters()):
            assert torch.equal(a, b), n
    with pytest.raises(RlMtdError, match="features.99"):
        apply_policy(
            tiny_baseline, policy, cache=cache, input_moments={"features.99": moments[name]}
        )


def test_proxy_with_data_fit(tiny_baseline, tiny_splits) -> None:
    config = ProxyConfig(bn_batches=2, bn_batch_size=64, fit="data", fit_images=64)
    proxy = Proxy(
        tiny_baseline,
        train_split=tiny_splits.train,
        proxy_split=tiny_splits.proxy,
        device="cpu",
        config=config,
        cache=FactorCache(),
        net=NET,
        width=WIDTH,
    )
    assert proxy.input_moments is not None
    assert set(proxy.input_moments) == {n for n, _ in conv_layers(tiny_baseline)}
    result = proxy.evaluate(_policy(tiny_baseline))
    assert 0.0 <= result.accuracy <= 1.0 and result.compression_ratio > 1
    with torch.no_grad():
        out = proxy.compress(_policy(tiny_baseline))(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    assert ProxyConfig().fit == "weights" and ProxyConfig().fit_images == 512


def test_proxy_config_refuses_a_bad_fit() -> None:
    with pytest.raises(RlMtdError, match="weights, data"):
        ProxyConfig(fit="bogus")
    with pytest.raises(RlMtdError, match="fit_images"):
        ProxyConfig(fit="data", fit_images=0)


def test_shrinking_the_moment_moves_the_fit_to_the_weight_only_one() -> None:
    """shrink_to_identity(M, 1) is a multiple of the identity: the whitened Tucker-2 fit is then
    the weight-only one; at 0 the moment is unchanged; between, the kernel error lies between."""
    from rl_mtd.datafit import shrink_to_identity

    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, 3, 3, generator=g)
    basis = torch.randn(16, 3, generator=g)
    m = (basis @ basis.T + 1e-3 * torch.eye(16)).double()
    assert torch.equal(shrink_to_identity(m, 0.0), m)

    def kernel_error(moment) -> float:
        t = factorize.tucker2(w, (8, 6), input_moment=moment)
        approx = torch.einsum("abhw,oa,ib->oihw", t.core, t.u_out, t.u_in)
        return float((approx - w).norm())

    plain = kernel_error(None)
    assert kernel_error(shrink_to_identity(m, 1.0)) == pytest.approx(plain, rel=1e-4)
    errors = [kernel_error(shrink_to_identity(m, s)) for s in (0.0, 0.5)]
    assert errors[0] > errors[1] > plain * (1 - 1e-6)
    with pytest.raises(RlMtdError, match="shrinkage"):
        shrink_to_identity(m, 1.5)
