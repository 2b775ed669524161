"""Per-layer decomposition policies: the JSON file format, validation, and applying a policy.

A policy file (``format`` 1)::

    {"format": 1, "net": "vgg16", "width": 1.0, "num_classes": 10,
     "layers": [{"name": "features.0", "shape": [64, 3, 3, 3], "method": "keep",
                 "rank": null, "ratio": 1.0}, ...],
     "meta": {...free-form...}}

``rank`` is null for ``keep``, ``[r_out, r_in]`` for ``tucker2`` and an int for ``cp``; ``ratio``
is the layer's parameter reduction (its parameters before / after).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl_mtd.decompose import (
    METHODS,
    FactorCache,
    build_decomposed,
    conv_layers,
    decompose_conv,
    decomposed_params,
    layer_params,
    normalize_rank,
    params_after,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.io import write_json_atomic
from rl_mtd.metrics import count_params
from rl_mtd.models import CFGS, build_vgg, check_net_name, model_spec

POLICY_FORMAT = 1


@dataclass(frozen=True)
class LayerChoice:
    """What to do with one conv layer."""

    name: str
    method: str
    rank: int | tuple[int, int] | None
    ratio: float
    shape: tuple[int, ...] | None = None  # the kernel shape the choice was made for

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape) if self.shape is not None else None,
            "method": self.method,
            "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank,
            "ratio": self.ratio,
        }


@dataclass
class Policy:
    """One ``LayerChoice`` per conv layer of a ``net`` at ``width``."""

    net: str
    width: float
    layers: list[LayerChoice]
    num_classes: int = 10
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_choices(
        cls,
        model: nn.Module,
        choices: list[tuple[str, int | tuple[int, int] | None]],
        *,
        net: str,
        width: float,
        num_classes: int = 10,
        meta: dict[str, Any] | None = None,
    ) -> Policy:
        """Build a policy from ``(method, rank)`` per conv layer of ``model``, computing ratios."""
        convs = conv_layers(model)
        if len(choices) != len(convs):
            raise RlMtdError(f"{len(choices)} choices for a model with {len(convs)} conv layers")
        layers = []
        for (name, conv), (method, rank) in zip(convs, choices):
            rank = normalize_rank(conv, method, rank)
            ratio = layer_params(conv) / decomposed_params(conv, method, rank)
            layers.append(LayerChoice(name, method, rank, ratio, tuple(conv.weight.shape)))
        return cls(net, float(width), layers, int(num_classes), dict(meta or {}))

    @classmethod
    def keep_all(cls, model: nn.Module, *, net: str, width: float, num_classes: int = 10) -> Policy:
        convs = conv_layers(model)
        return cls.from_choices(
            model, [("keep", None)] * len(convs), net=net, width=width, num_classes=num_classes
        )

    # ------------------------------------------------------------------ summaries
    def methods(self) -> list[str]:
        return [c.method for c in self.layers]

    def choices(self) -> list[tuple[str, Any]]:
        """``(method, rank)`` per layer (rank None for a kept layer), as ``BudgetMeter`` and
        ``rl_mtd.latency.LatencyModel`` take them."""
        return [(c.method, None if c.method == "keep" else c.rank) for c in self.layers]

    def predicted_params(self, model: nn.Module) -> int:
        """Parameters ``apply_policy(model, self)`` will have, from the per-layer choices alone."""
        convs = check_matches(model, self)
        return params_after(count_params(model), convs, self.choices())

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "net": self.net,
            "width": self.width,
            "num_classes": self.num_classes,
            "layers": [c.to_dict() for c in self.layers],
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "policy") -> Policy:
        return _parse_policy(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Read and validate a policy file; a bad file raises ``RlMtdError`` naming the field."""
        path = Path(path)
        if not path.is_file():
            raise RlMtdError(f"policy file {path} does not exist")
        try:
            # utf-8-sig: an editor's byte-order mark is not a reason to refuse a policy
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RlMtdError(
                f"policy file {path} is not valid JSON ({exc}); it may be truncated or "
                "hand-edited - use the policy.json written by run_agent.py"
            ) from None
        return _parse_policy(data, str(path))


def _fail(source: str, msg: str) -> RlMtdError:
    return RlMtdError(f"{source}: {msg}")


def _parse_policy(data: Any, source: str) -> Policy:
    if not isinstance(data, dict) or "format" not in data:  # every policy file states it
        report = isinstance(data, dict) and "finetuned_acc" in data
        config = isinstance(data, dict) and "net" in data and "preset" in data
        what = "a run's report.json" if report else "a run's config.json" if config else ""
        raise RlMtdError(
            f"{source} is not an rl_mtd policy file ("
            + (f"{what}; its policy.json sits beside it" if what else "no 'format'")
            + "); pass the policy.json or agent.zip of a run"
        )
    fmt = data.get("format")
    if isinstance(fmt, bool) or fmt != POLICY_FORMAT:
        raise _fail(source, f"field 'format' is {fmt!r}; this version reads format {POLICY_FORMAT}")
    for key in ("net", "width", "layers"):
        if key not in data:
            raise _fail(source, f"missing field {key!r}")
    try:
        net = check_net_name(data["net"])
    except RlMtdError as exc:
        raise _fail(source, f"field 'net': {exc}") from None
    width = data["width"]
    if (
        isinstance(width, bool)
        or not isinstance(width, int | float)
        or not math.isfinite(width)
        or not width > 0
    ):
        raise _fail(source, f"field 'width' must be a positive number, got {width!r}")
    num_classes = data.get("num_classes", 10)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise _fail(source, f"field 'num_classes' must be an int >= 2, got {num_classes!r}")
    raw_layers = data["layers"]
    if not isinstance(raw_layers, list) or not raw_layers:
        raise _fail(source, "field 'layers' must be a non-empty list")
    expected = conv_layers(build_vgg(net, num_classes=num_classes, width=width).to("meta"))
    if len(raw_layers) != len(expected):
        others = [
            other
            for other in CFGS
            if len(conv_layers(build_vgg(other, num_classes=num_classes, width=width).to("meta")))
            == len(raw_layers)
        ]
        hint = f" (a policy for {' or '.join(others)}, with 'net' edited?)" if others else ""
        raise _fail(
            source,
            f"field 'layers' has {len(raw_layers)} entries but {net} has {len(expected)} conv "
            f"layers{hint}",
        )
    layers = [
        _parse_layer(item, i, name, conv, source)
        for i, (item, (name, conv)) in enumerate(zip(raw_layers, expected))
    ]
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail(source, "field 'meta' must be an object")
    return Policy(net, float(width), layers, num_classes, meta)


def _parse_layer(item: Any, i: int, name: str, conv: nn.Conv2d, source: str) -> LayerChoice:
    where = f"layers[{i}]"
    if not isinstance(item, dict):
        raise _fail(source, f"{where} must be an object")
    for key in ("name", "method", "rank"):
        if key not in item:
            raise _fail(source, f"{where} is missing field {key!r}")
    if item["name"] != name:
        raise _fail(source, f"{where}.name {item['name']!r} is not that layer's name {name!r}")
    method = item["method"]
    if method not in METHODS:
        raise _fail(
            source, f"{where}.method {method!r} is unknown; choose one of {', '.join(METHODS)}"
        )
    if method == "keep" and item["rank"] is not None:
        raise _fail(
            source, f"{where} keeps its layer, so its rank must be null, not {item['rank']!r}"
        )
    shape = item.get("shape")
    if shape is not None and (
        not isinstance(shape, list) or list(shape) != list(conv.weight.shape)
    ):
        raise _fail(
            source,
            f"{where}.shape {shape!r} does not match the {list(conv.weight.shape)} kernel of "
            "that layer in the policy's net and width ('width' or 'shape' edited?)",
        )
    rank = item["rank"]
    if isinstance(rank, list):
        rank = tuple(rank)
    for r in rank if isinstance(rank, tuple) else [rank]:
        if r is None and method == "keep":
            continue
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise _fail(source, f"{where}.rank must hold positive ints, got {item['rank']!r}")
    try:
        rank = normalize_rank(conv, method, rank)
    except RlMtdError as exc:
        raise _fail(source, f"{where}.rank: {exc}") from None
    ratio = layer_params(conv) / decomposed_params(conv, method, rank)
    given = item.get("ratio")
    if given is not None and (
        isinstance(given, bool)
        or not isinstance(given, int | float)
        or not math.isfinite(given)
        or not math.isclose(given, ratio, rel_tol=1e-6)
    ):
        raise _fail(
            source,
            f"{where}.ratio {given!r} disagrees with its rank (expected {ratio:.6g}); after "
            "editing a rank, update its ratio or delete the ratio field",
        )
    return LayerChoice(str(item["name"]), method, rank, ratio, tuple(conv.weight.shape))


# ----------------------------------------------------------------------------- applying


def check_matches(model: nn.Module, policy: Policy) -> list[tuple[str, nn.Conv2d]]:
    """The model's conv layers, after checking they are the ones ``policy`` was made for."""
    convs = conv_layers(model)
    for i, ((name, conv), choice) in enumerate(zip(convs, policy.layers)):
        if choice.name != name:
            raise RlMtdError(
                f"the policy ({policy.net}, width {policy.width}) does not fit this model: "
                f"its layer {i} is {choice.name!r}, the model's is {name!r}"
            )
        shape = tuple(conv.weight.shape)
        if choice.shape is not None and shape != tuple(choice.shape):
            raise RlMtdError(
                f"the policy ({policy.net}, width {policy.width}) does not fit this model: "
                f"layer {i} ({name}) has kernel {list(shape)}, the policy expects "
                f"{list(choice.shape)}"
            )
    if len(convs) != len(policy.layers):
        raise RlMtdError(
            f"the policy ({policy.net}, width {policy.width}) has {len(policy.layers)} conv "
            f"layers, this model has {len(convs)}"
        )
    spec = model_spec(model)
    unstated = any(choice.shape is None for choice in policy.layers)
    if unstated and spec is not None and (spec.net, spec.width) != (policy.net, policy.width):
        # A policy built in memory states no kernel shapes; its net and width say them.
        raise RlMtdError(
            f"the policy ({policy.net}, width {policy.width:g}) does not fit this model "
            f"({spec.net}, width {spec.width:g}); build the model the policy was made for"
        )
    return convs


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_policy(
    model: nn.Module,
    policy: Policy,
    *,
    cache: FactorCache | None = None,
    factorize: bool = True,
    wkeys: list[str] | None = None,
    input_moments: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A compressed copy of ``model`` with each conv replaced as ``policy`` says.

    With ``factorize=False`` the decomposed blocks get untrained weights: the structure for
    loading a saved compressed state_dict. ``wkeys`` are precomputed kernel hashes (saves
    rehashing in the search loop). ``input_moments`` maps conv layer names to their input
    moments (``rl_mtd.decompose.collect_input_moments``); those layers get the data-aware fit,
    which minimises their output error rather than their kernel error.
    """
    out = copy.deepcopy(model)
    convs = check_matches(out, policy)  # collected before any replacement
    moments = dict(input_moments or {})
    unknown = sorted(set(moments) - {name for name, _ in convs})
    if unknown:
        raise RlMtdError(
            f"input_moments name layers this model does not have: {', '.join(unknown)}; "
            "collect them on the model being compressed"
        )
    for i, ((name, conv), choice) in enumerate(zip(convs, policy.layers)):
        if choice.method == "keep":
            continue
        if factorize:
            block = decompose_conv(
                conv,
                choice.method,
                choice.rank,
                cache=cache,
                wkey=wkeys[i] if wkeys else None,
                input_moment=moments.get(name),
            )
        else:
            block = build_decomposed(conv, choice.method, choice.rank)
        _set_module(out, name, block)
    return out


def __getattr__(name: str) -> Any:
    """``save_compressed``/``load_compressed`` live in ``rl_mtd.checkpoints``; importable here too."""
    if name in ("save_compressed", "load_compressed"):
        from rl_mtd import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
