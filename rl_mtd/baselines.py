"""Baseline compression strategies to compare the learned agent against.

Every strategy turns a whole-model target ratio ``T`` into a :class:`~rl_mtd.policy.Policy`
whose predicted parameters are at most ``params_original / T``. ``T`` counts the whole model
(BatchNorm and the head included), the same definition as ``ProxyResult.compression_ratio``.

Strategies (``STRATEGIES``):

- ``tucker2`` / ``cp`` (:func:`uniform_policy`): one method and one per-layer reduction for every
  conv layer, the smallest reduction that reaches the target.
- ``vbmf`` (:func:`vbmf_policy`): Tucker-2 ranks picked per layer by empirical variational
  Bayesian matrix factorisation of the kernel's two channel unfoldings, as in Kim et al.,
  "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications" (ICLR 2016), then scaled by one common factor to meet the target.
- ``sensitivity`` (:func:`sensitivity_policy`): the recipe of MTD, "Automatic Selection of Tensor
  Decomposition for Compressing Convolutional Neural Networks: A Case Study on VGG-type
  Networks" (IPDPSW 2021): measure every layer's accuracy under each method and level alone,
  then compress greedily where it costs least accuracy per parameter removed.
- ``random`` (:func:`random_search`): random per-layer choices pushed through the budget wall,
  the best by proxy accuracy.

Every policy is built with ``Policy.from_choices`` and carries
``meta={"strategy": name, "target_ratio": T, ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import nn

from rl_mtd.budget import DEFAULT_LEVELS, BudgetTable, check_levels, check_methods, check_target
from rl_mtd.decompose import (
    DECOMPOSED,
    METHODS,
    Rank,
    conv_layers,
    decomposed_params,
    layer_params,
    params_after,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_params
from rl_mtd.models import model_spec
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy, ProxyResult
from rl_mtd.vbmf import estimate_rank

__all__ = [
    "DEFAULT_LEVELS",
    "SENSITIVITY_LEVELS",
    "STRATEGIES",
    "SensitivityStudy",
    "random_policies",
    "random_search",
    "sensitivity_policy",
    "strategy_policy",
    "uniform_policy",
    "vbmf_policy",
    "vbmf_ranks",
]

STRATEGIES: tuple[str, ...] = ("tucker2", "cp", "vbmf", "sensitivity", "random")
SENSITIVITY_LEVELS: tuple[float, ...] = (2, 4, 8, 16, 32, 64)
"""Levels of the per-layer sensitivity study."""
RANDOM_METHODS: tuple[str, ...] = ("keep", "tucker2", "cp")
DEFAULT_N_RANDOM = 32

_EPS = 1e-4  # accuracy (fraction) added to every loss in the greedy score; see sensitivity_policy

Choice = tuple[str, Rank]  # (method, rank), as Policy.from_choices takes it


# ----------------------------------------------------------------------------- helpers


def _unreachable(target: float, best: int, params_original: int, what: str) -> RlMtdError:
    return RlMtdError(
        f"target ratio {target:g} cannot be reached by {what}: at most "
        f"{params_original / best:.2f}x on this model; lower the target"
    )


def _model_meta(model: nn.Module) -> dict[str, Any]:
    """net, width and num_classes a model built by ``build_vgg`` carries."""
    spec = model_spec(model)
    head = getattr(model, "classifier", None)
    return {
        "net": spec.net if spec else None,
        "width": spec.width if spec else None,
        "num_classes": spec.num_classes if spec else getattr(head, "out_features", 10),
    }


# ----------------------------------------------------------------------------- uniform


def _uniform_choices(convs: list[tuple[str, nn.Conv2d]], method: str, r: float) -> list[Choice]:
    out: list[Choice] = []
    for _, conv in convs:
        rank = rank_for_ratio(conv, method, r)
        if decomposed_params(conv, method, rank) >= layer_params(conv):
            out.append(("keep", None))
        else:
            out.append((method, rank))
    return out


def uniform_policy(
    model: nn.Module,
    method: str,
    target: float,
    *,
    net: str,
    width: float,
    num_classes: int = 10,
) -> Policy:
    """Every conv layer decomposed with ``method`` at one shared per-layer reduction ``r``.

    ``r`` is continuous; each layer gets ``rank_for_ratio(conv, method, r)``. The returned
    policy uses the smallest ``r`` (found by bisection in ``log r`` to a relative tolerance of
    1e-6) whose whole-model parameters are at most ``params_original / target``. A layer that
    its decomposition at ``r`` would not shrink (decomposed parameters >= the layer's own, as for
    the 3-channel first conv at mild ``r``) is kept. ``meta["layer_ratio"]`` records ``r``.

    Raises:
        RlMtdError: for a method other than ``tucker2``/``cp`` or an unreachable target (every
            layer at rank 1 is still too big).
    """
    if method not in DECOMPOSED:
        raise RlMtdError(f"uniform_policy needs method 'tucker2' or 'cp', got {method!r}")
    target = check_target(target)
    convs = conv_layers(model)
    if not convs:
        raise RlMtdError("the model has no conv layers to compress")
    params = count_params(model)
    allowed = params / target

    def total(r: float) -> int:
        return params_after(params, convs, _uniform_choices(convs, method, r))

    lo, hi = 1.0, 1.0
    if total(hi) > allowed:
        # Past the largest layer's parameter count every layer sits at rank 1: nothing more.
        r_max = 2.0 * max(layer_params(c) for _, c in convs)
        hi = 2.0
        while total(hi) > allowed:
            if hi >= r_max:
                raise _unreachable(target, total(hi), params, f"{method} at rank 1 everywhere")
            lo, hi = hi, min(2.0 * hi, r_max)
        while hi / lo > 1.0 + 1e-6:  # total(lo) > allowed >= total(hi)
            mid = math.sqrt(lo * hi)
            if total(mid) > allowed:
                lo = mid
            else:
                hi = mid
    choices = _uniform_choices(convs, method, hi)
    meta = {"strategy": method, "target_ratio": target, "layer_ratio": hi}
    return Policy.from_choices(
        model, choices, net=net, width=width, num_classes=num_classes, meta=meta
    )


# ----------------------------------------------------------------------------- VBMF


def vbmf_ranks(conv: nn.Conv2d) -> tuple[int, int]:
    """Tucker-2 ranks ``(r_out, r_in)`` of ``conv`` by EVBMF, data-free (Kim et al. 2016).

    ``r_out`` is the EVBMF rank of the mode-0 unfolding (``O x I*kh*kw``) of the kernel and
    ``r_in`` that of the mode-1 unfolding (``I x O*kh*kw``), each at least 1 (see
    :func:`rl_mtd.vbmf.estimate_rank`).
    """
    w = conv.weight.detach().cpu().double()
    o, i = w.shape[0], w.shape[1]
    r_out = estimate_rank(w.reshape(o, -1))
    r_in = estimate_rank(w.transpose(0, 1).reshape(i, -1))
    return min(o, r_out), min(i, r_in)


def _scaled(base: tuple[int, int], s: float, conv: nn.Conv2d) -> tuple[int, int]:
    # floor(x + 0.5) rounds half up, so the ranks never decrease as s grows.
    r_out = min(conv.out_channels, max(1, math.floor(s * base[0] + 0.5)))
    r_in = min(conv.in_channels, max(1, math.floor(s * base[1] + 0.5)))
    return r_out, r_in


def _vbmf_choices(convs: list[tuple[str, nn.Conv2d]], bases: list[tuple[int, int]],
                  s: float) -> list[Choice]:  # fmt: skip
    out: list[Choice] = []
    for (_, conv), base in zip(convs, bases):
        rank = _scaled(base, s, conv)
        if decomposed_params(conv, "tucker2", rank) >= layer_params(conv):
            out.append(("keep", None))
        else:
            out.append(("tucker2", rank))
    return out


def vbmf_policy(
    model: nn.Module,
    target: float,
    *,
    net: str,
    width: float,
    num_classes: int = 10,
) -> Policy:
    """Tucker-2 everywhere with EVBMF ranks (Kim et al., ICLR 2016), scaled to the target.

    Kim et al. use the EVBMF ranks of each kernel's two channel unfoldings (:func:`vbmf_ranks`)
    as they are, which fixes the compression. To compare strategies at one budget, both ranks
    of every layer are multiplied by one common factor ``s`` (rounded half up and clipped to
    ``[1, channels]``), so the layers keep their EVBMF proportions. ``s`` is the largest factor
    (bisection in ``log s``) whose whole-model ratio still reaches ``target``: the ratio reaches
    the target as closely as possible from above. A layer whose Tucker-2 at the scaled ranks
    would not shrink it is kept. ``meta`` records ``scale`` (``s``) and the unscaled
    ``vbmf_ranks``.

    Raises:
        RlMtdError: for an unreachable target (Tucker-2 at rank (1, 1) everywhere is too big).
    """
    target = check_target(target)
    convs = conv_layers(model)
    if not convs:
        raise RlMtdError("the model has no conv layers to compress")
    bases = [vbmf_ranks(conv) for _, conv in convs]
    params = count_params(model)
    allowed = params / target

    def total(s: float) -> int:
        return params_after(params, convs, _vbmf_choices(convs, bases, s))

    lo = 0.25 / max(max(b) for b in bases)  # every rank rounds to 0 -> clipped to 1
    hi = 2.0 * max(max(c.out_channels, c.in_channels) for _, c in convs)  # every rank full
    if total(lo) > allowed:
        raise _unreachable(target, total(lo), params, "Tucker-2 at rank (1, 1) everywhere")
    if total(hi) <= allowed:
        lo = hi
    else:
        while hi / lo > 1.0 + 1e-9:  # total(lo) <= allowed < total(hi)
            mid = math.sqrt(lo * hi)
            if total(mid) <= allowed:
                lo = mid
            else:
                hi = mid
    meta = {
        "strategy": "vbmf",
        "target_ratio": target,
        "scale": lo,
        "vbmf_ranks": [list(b) for b in bases],
    }
    return Policy.from_choices(
        model, _vbmf_choices(convs, bases, lo), net=net, width=width,
        num_classes=num_classes, meta=meta,
    )  # fmt: skip


# ----------------------------------------------------------------------------- sensitivity


StudyKey = tuple[int, str, float]  # (layer index, method, level)


class SensitivityStudy:
    """Proxy accuracy of the model with ONE conv layer compressed, for every layer x method x level.

    The per-layer study of MTD ("Automatic Selection of Tensor Decomposition for Compressing
    Convolutional Neural Networks: A Case Study on VGG-type Networks", IPDPSW 2021). Each entry
    compresses only that layer, at ``rank_for_ratio(conv, method, level)``, keeps the others
    and scores it with ``proxy.evaluate``. Options that would not shrink their layer (decomposed
    parameters >= the layer's own) are not measured: no greedy move can use them.

    Results are cached in :attr:`results` (``(layer index, method, level) -> accuracy``), so
    :meth:`run` evaluates each entry once however often it is called; levels that give the
    same rank share one evaluation. :attr:`evaluations` counts the ``proxy.evaluate`` calls that
    were not memoised by the proxy itself.
    """

    def __init__(
        self,
        proxy: Proxy,
        methods: Sequence[str] = DECOMPOSED,
        levels: Sequence[float] = SENSITIVITY_LEVELS,
    ):
        self.proxy = proxy
        self.methods = check_methods(methods, DECOMPOSED)
        self.levels = check_levels(levels)
        self.table = BudgetTable(proxy.model, self.methods, self.levels)
        self.results: dict[StudyKey, float] = {}
        self.evaluations = 0
        self._by_rank: dict[tuple[int, str, Rank], float] = {}

    def keys(self) -> list[tuple[StudyKey, Rank]]:
        """Every entry the study measures, with its rank, in layer-major order."""
        out = []
        for i, layer in enumerate(self.table.layers):
            for (mi, li), (rank, params) in layer.options.items():
                if params < layer.original:
                    out.append(((i, self.methods[mi], self.levels[li]), rank))
        return out

    def run(self, progress: bool = False) -> dict[StudyKey, float]:
        """Measure every entry not measured yet; return all results (a copy)."""
        todo = [(k, r) for k, r in self.keys() if k not in self.results]
        items: Iterable[tuple[StudyKey, Rank]] = todo
        if progress and todo:
            from tqdm import tqdm

            items = tqdm(todo, desc="sensitivity", unit="eval")
        n = len(self.table.layers)
        for key, rank in items:
            i, method, _ = key
            same = (i, method, rank)
            if same not in self._by_rank:
                choices: list[Choice] = [("keep", None)] * n
                choices[i] = (method, rank)
                policy = Policy.from_choices(
                    self.proxy.model, choices, net=self.proxy.net, width=self.proxy.width,
                    num_classes=self.proxy.num_classes,
                )  # fmt: skip
                result = self.proxy.evaluate(policy)
                if not result.cached:
                    self.evaluations += 1
                self._by_rank[same] = result.accuracy
            self.results[key] = self._by_rank[same]
        return dict(self.results)


def sensitivity_policy(
    proxy: Proxy,
    target: float,
    *,
    levels: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    study: SensitivityStudy | None = None,
    progress: bool = False,
) -> Policy:
    """Greedy per-layer choice from a sensitivity study: the recipe of MTD (IPDPSW 2021).

    1. Run (or reuse) a :class:`SensitivityStudy`: the proxy accuracy with each single layer
       compressed by each method at each level (default levels ``SENSITIVITY_LEVELS``, methods
       ``tucker2`` and ``cp``).
    2. Start from all layers kept. Repeatedly apply, over all layers, the move to a stronger
       option (another method/level of that layer with fewer parameters than its current
       option) with the smallest ``(max(acc_current - acc_option, 0) + eps) / params_removed``,
       where ``acc_current`` is the study's accuracy for the layer's current option (the proxy's
       baseline accuracy while kept) and ``eps = 1e-4``, so moves that lose nothing rank by
       parameters removed. Ties go to more parameters removed, then the earlier layer.
    3. Stop as soon as the predicted whole-model ratio reaches ``target``.

    The study is measured only after the target is known to be reachable. Passing ``study``
    reuses its cached evaluations (its methods and levels are used; ``levels``/``methods``, when
    given, must match them).

    Raises:
        RlMtdError: when even the strongest option of every layer misses the target.
    """
    target = check_target(target)
    if study is None:
        study = SensitivityStudy(
            proxy,
            methods=DECOMPOSED if methods is None else methods,
            levels=SENSITIVITY_LEVELS if levels is None else levels,
        )
    else:
        if study.proxy is not proxy:
            raise RlMtdError("the sensitivity study was made with another proxy")
        if methods is not None and tuple(methods) != study.methods:
            raise RlMtdError(f"methods {tuple(methods)} differ from the study's {study.methods}")
        if levels is not None and tuple(levels) != study.levels:
            raise RlMtdError(f"levels {tuple(levels)} differ from the study's {study.levels}")
    table = study.table
    allowed = table.params_original / target
    best = table.fixed + sum(
        min(layer.original, min(p for _, p in layer.options.values())) for layer in table.layers
    )
    if best > allowed:
        raise _unreachable(
            target, best, table.params_original,
            f"methods {', '.join(study.methods)} at levels {', '.join(map(str, study.levels))}",
        )  # fmt: skip
    results = study.run(progress=progress)

    n = len(table.layers)
    current: list[tuple[int, int] | None] = [None] * n  # None: kept
    cur_params = [layer.original for layer in table.layers]
    cur_acc = [float(proxy.baseline_acc)] * n
    total = table.params_original
    while total > allowed:
        pick: tuple[tuple[float, int, int, int], int, tuple[int, int]] | None = None
        for i, layer in enumerate(table.layers):
            for order, (opt, (_, params)) in enumerate(layer.options.items()):
                removed = cur_params[i] - params
                if removed <= 0:
                    continue
                acc = results[(i, study.methods[opt[0]], study.levels[opt[1]])]
                score = (max(cur_acc[i] - acc, 0.0) + _EPS) / removed
                rank_key = (score, -removed, i, order)
                if pick is None or rank_key < pick[0]:
                    pick = (rank_key, i, opt)
        assert pick is not None  # reachability was checked above
        _, i, opt = pick
        layer = table.layers[i]
        total -= cur_params[i] - layer.params(opt)
        current[i] = opt
        cur_params[i] = layer.params(opt)
        cur_acc[i] = results[(i, study.methods[opt[0]], study.levels[opt[1]])]

    choices: list[Choice] = [
        ("keep", None) if c is None else (study.methods[c[0]], layer.rank(c))
        for c, layer in zip(current, table.layers)
    ]
    meta = {"strategy": "sensitivity", "target_ratio": target,
            "levels": list(study.levels), "methods": list(study.methods)}  # fmt: skip
    return Policy.from_choices(
        proxy.model, choices, net=proxy.net, width=proxy.width,
        num_classes=proxy.num_classes, meta=meta,
    )  # fmt: skip


# ----------------------------------------------------------------------------- random


def random_policies(
    proxy_or_model: Proxy | nn.Module,
    target: float,
    n: int,
    *,
    methods: Sequence[str] = RANDOM_METHODS,
    levels: Sequence[float] = DEFAULT_LEVELS,
    seed: int = 0,
    net: str | None = None,
    width: float | None = None,
    num_classes: int | None = None,
) -> list[Policy]:
    """``n`` random policies that each reach ``target``.

    Per layer, a (method, level) drawn uniformly from ``methods`` x ``levels`` (seeded numpy
    generator) goes through ``BudgetTable.wall``, which raises it just enough that the layers
    still to come can reach the target, so every policy reaches it (the random agent of AMC's
    budget-constrained search). ``net``, ``width`` and ``num_classes`` default to the proxy's
    (or the model's own attributes, for a model built by ``build_vgg``). The same seed gives
    the same policies.

    Raises:
        RlMtdError: for a target beyond what these methods and levels can reach.
    """
    target = check_target(target)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RlMtdError(f"n must be a positive int, got {n!r}")
    if isinstance(proxy_or_model, Proxy):
        model = proxy_or_model.model
        found = {"net": proxy_or_model.net, "width": proxy_or_model.width,
                 "num_classes": proxy_or_model.num_classes}  # fmt: skip
    else:
        model = proxy_or_model
        found = _model_meta(model)
    net = net if net is not None else found["net"]
    width = width if width is not None else found["width"]
    num_classes = num_classes if num_classes is not None else found["num_classes"]
    if net is None or width is None:
        raise RlMtdError("pass net=... and width=...: the model does not say which VGG it is")
    methods = check_methods(methods, METHODS)
    table = BudgetTable(model, methods, check_levels(levels))
    table.check_target(target)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        choices: list[tuple[int, int]] = []
        for _ in table.layers:
            draw = (int(rng.integers(len(table.methods))), int(rng.integers(len(table.levels))))
            choices.append(table.wall(choices, draw, target))
        meta = {"strategy": "random", "target_ratio": target, "seed": seed, "index": k}
        out.append(
            Policy.from_choices(
                model, table.to_choices(choices), net=net, width=width,
                num_classes=num_classes, meta=meta,
            )  # fmt: skip
        )
    return out


def random_search(
    proxy: Proxy,
    target: float,
    n: int,
    *,
    seed: int = 0,
    methods: Sequence[str] = RANDOM_METHODS,
    levels: Sequence[float] = DEFAULT_LEVELS,
    progress: bool = False,
) -> tuple[Policy, list[ProxyResult]]:
    """Score ``n`` :func:`random_policies` with the proxy; the best and every result.

    The best has the highest proxy accuracy; ties go to the higher compression ratio, then the
    earlier policy. Results are in the order of the policies.
    """
    policies = random_policies(proxy, target, n, methods=methods, levels=levels, seed=seed)
    items: Iterable[Policy] = policies
    if progress:
        from tqdm import tqdm

        items = tqdm(policies, desc="random search", unit="policy")
    results = [proxy.evaluate(p) for p in items]
    best = max(range(n), key=lambda k: (results[k].accuracy, results[k].compression_ratio, -k))
    return policies[best], results


# ----------------------------------------------------------------------------- dispatch


def strategy_policy(
    name: str,
    proxy: Proxy,
    target: float,
    *,
    seed: int = 0,
    n_random: int = DEFAULT_N_RANDOM,
    levels: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    study: SensitivityStudy | None = None,
    progress: bool = False,
) -> Policy:
    """The policy of strategy ``name`` (one of ``STRATEGIES``) for ``target`` on ``proxy``'s model.

    ``levels``/``methods`` apply to ``sensitivity`` (default ``SENSITIVITY_LEVELS``, Tucker-2 and
    CP) and ``random`` (default ``DEFAULT_LEVELS``, keep/Tucker-2/CP); ``seed`` and ``n_random``
    to ``random``; ``study`` to ``sensitivity``. ``tucker2``, ``cp`` and ``vbmf`` need no
    evaluations.
    """
    common = {"net": proxy.net, "width": proxy.width, "num_classes": proxy.num_classes}
    if name in ("tucker2", "cp"):
        return uniform_policy(proxy.model, name, target, **common)
    if name == "vbmf":
        return vbmf_policy(proxy.model, target, **common)
    if name == "sensitivity":
        return sensitivity_policy(
            proxy, target, levels=levels, methods=methods, study=study, progress=progress
        )
    if name == "random":
        best, _ = random_search(
            proxy, target, n_random, seed=seed,
            methods=RANDOM_METHODS if methods is None else methods,
            levels=DEFAULT_LEVELS if levels is None else levels, progress=progress,
        )  # fmt: skip
        return best
    raise RlMtdError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
