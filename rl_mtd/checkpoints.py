"""Checkpoints: baselines and compressed models, saved atomically, read with clear errors.

A baseline file is ``{"format": 1, "kind": "baseline", "net", "width", "num_classes",
"state_dict", "meta"}`` written with ``torch.save`` and read with ``weights_only=True``.
A bare state_dict of a ``build_vgg`` model is accepted too. A compressed file is ``{"format": 1,
"kind": "compressed", "policy", "state_dict", ...}``: no pickled modules, rebuilt by
``apply_policy`` on a fresh model.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl_mtd.errors import RlMtdError
from rl_mtd.io import torch_save_atomic
from rl_mtd.models import CFGS, build_vgg, check_net_name
from rl_mtd.policy import Policy, apply_policy

CHECKPOINT_FORMAT = 1


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with an error that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise RlMtdError(f"checkpoint {path} does not exist; pass an existing file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load of a foreign file raises almost anything
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours parts of its message
        # weights_only met a class it will not rebuild ("Unsupported class" before torch 2.4)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise RlMtdError(
                f"checkpoint {path} holds pickled Python objects (a whole model saved with "
                "torch.save(model)?), which rl_mtd does not unpickle; save the weights instead: "
                "torch.save(model.state_dict(), path)"
            ) from None
        # A real OS error (permissions, I/O); torch's zip reader says EINVAL for a cut-off file.
        if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):
            raise RlMtdError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
        if path.suffix in (".json", ".zip"):  # torch.load failed: not a torch.save file
            raise RlMtdError(
                f"{path} is not a PyTorch checkpoint but a {path.suffix} file (a policy.json or "
                "an agent.zip? those are replayed, not loaded as weights)"
            ) from None
        what = _plain_text(path)
        if what:
            raise RlMtdError(
                f"checkpoint {path} is {what}, not a PyTorch checkpoint; pass the file "
                "torch.save wrote"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        # torch's own words only where they say something (a text file gave "KeyError: '101'"),
        # are short and are not its advice to unpickle (weights_only=False)
        quiet = isinstance(exc, OSError) or not 12 <= len(first) <= 160 or "weights_only" in first
        said = "" if quiet else f" (torch.load: {first})"
        raise RlMtdError(
            f"checkpoint {path} cannot be read: it is truncated or not a PyTorch file{said}; "
            "re-save it, or pass the file torch.save wrote"
        ) from None
    if not isinstance(data, dict):
        raise RlMtdError(
            f"checkpoint {path} holds a {type(data).__name__}, not the dict of weights a "
            "checkpoint is; save it with torch.save(model.state_dict(), path)"
        )
    return data


def _plain_text(path: Path) -> str:
    """ "an empty file" or "a text file" for what no checkpoint can be, else ""."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:  # binary (or text cut inside a character: said as not PyTorch)
        return ""
    return "" if b"\0" in head else "a text file"


def save_baseline(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    net: str,
    width: float,
    num_classes: int = 10,
    meta: dict[str, Any] | None = None,
) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": "baseline",
            "net": net,
            "width": float(width),
            "num_classes": int(num_classes),
            "state_dict": state,
            "meta": dict(meta or {}),
        },
        path,
    )


def _guess_net(state: dict[str, torch.Tensor]) -> str | None:
    """The VGG whose conv count matches a state_dict's 4-D weights, if any."""
    n_conv = sum(1 for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    for name, cfg in CFGS.items():
        if sum(1 for v in cfg if v != "M") == n_conv:
            return name
    return None


def _guess_width(state: dict[str, torch.Tensor], net: str) -> float | None:
    """The width of ``net`` whose weights have a state_dict's shapes, if one does: the first
    conv's outputs over 64, checked against a net built at that width."""
    first = next((v for k, v in state.items() if k.endswith("weight") and v.ndim == 4), None)
    if first is None:
        return None
    width = first.shape[0] / 64
    try:
        shapes = {k: v.shape for k, v in build_vgg(net, width=width).state_dict().items()}
    except RlMtdError:
        return None
    fits = all(k in state and state[k].shape == shape for k, shape in shapes.items())
    return width if fits else None


def _misfit(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    net: str,
    width: float,
    num_classes: int,
    exc: RuntimeError,
) -> str:
    """Why a state_dict does not load into ``net``: another net, width or class count when its
    shapes say so (the likely fix first), else the first line of torch's own complaint."""
    head = f"checkpoint {path} does not fit {net} at width {width:g}"
    guess = _guess_net(state)
    if guess and guess != net:
        return f"{head}: it looks like a {guess} (its conv count); pass --net {guess}"
    wide = _guess_width(state, net)
    if wide is not None and wide != width:
        return f"{head}: it looks like width {wide:g}; pass --width {wide:g}"
    linear = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if linear and linear[-1].shape[0] != num_classes:
        return (
            f"{head}: its last layer has {linear[-1].shape[0]} outputs, but the data has "
            f"{num_classes} classes; pass a checkpoint trained on this dataset's classes"
        )
    first = (str(exc).splitlines()[1:2] or [str(exc)[:200]])[0].strip()
    return (
        f"{head}: {first}; it is not a whole {net} state_dict (edited, or saved from another "
        "model): pass the file torch.save(model.state_dict(), path) wrote for this network"
    )


WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
"""Where training scripts commonly keep the weights inside a checkpoint dict."""

PREFIXES = ("module.", "_orig_mod.")
"""What nn.DataParallel / DistributedDataParallel and torch.compile put before every key."""


def _state_dict_in(path: str | os.PathLike, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint: the dict itself or one of ``WRAPPER_KEYS`` in it, with a
    prefix every key shares (``PREFIXES``) taken off."""

    def tensors(d: Any) -> bool:
        return (
            isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())
        )

    state = next((data[k] for k in WRAPPER_KEYS if tensors(data.get(k))), data)
    if not tensors(state):
        keys = ", ".join(map(str, list(data)[:8])) + (", ..." if len(data) > 8 else "")
        raise RlMtdError(
            f"{path} holds no state_dict of tensors (its top-level keys: {keys or 'none'}); "
            "save the model's state_dict(), alone or under 'state_dict'"
        )
    while True:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix) :]: v for k, v in state.items()}


def check_finite(model: nn.Module, source: str) -> None:
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RlMtdError(
                f"{source}: tensor {name} holds NaN or inf values; the training that made it "
                "diverged - retrain the baseline or pass another checkpoint"
            )


def load_baseline(
    path: str | os.PathLike, *, net: str, width: float | None = None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a baseline for ``net``; a checkpoint of another net or width stops with a clear error.

    Returns the model and the checkpoint's metadata (net, width, num_classes, meta).
    """
    check_net_name(net)
    data = read_checkpoint(path)
    if data.get("kind") == "compressed":
        raise RlMtdError(
            f"{path} is a compressed checkpoint; pass the uncompressed baseline as --checkpoint"
        )
    state = _state_dict_in(path, data)
    saved_net = data.get("net")
    if saved_net is not None and saved_net != net:
        raise RlMtdError(
            f"checkpoint {path} is a {saved_net}, not a {net}; pass --net {saved_net} or a "
            f"{net} checkpoint"
        )
    saved_width = data.get("width")
    if width is None:
        width = float(saved_width) if saved_width is not None else 1.0
    elif saved_width is not None and float(saved_width) != float(width):
        raise RlMtdError(
            f"checkpoint {path} is {net} at width {saved_width}, not {width}; pass "
            f"--width {saved_width}"
        )
    if num_classes is None:
        num_classes = int(data.get("num_classes", 10))
    model = build_vgg(net, num_classes=num_classes, width=width)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RlMtdError(_misfit(path, state, net, width, num_classes, exc)) from None
    check_finite(model, str(path))
    info = {"net": net, "width": width, "num_classes": num_classes, "meta": data.get("meta", {})}
    return model, info


# ----------------------------------------------------------------------------- compressed


def save_compressed(
    path: str | os.PathLike, model: nn.Module, policy: Policy, **extra: Any
) -> None:
    """Save a compressed model as its state_dict plus its policy (no pickled modules)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            "kind": "compressed",
            "policy": policy.to_dict(),
            "state_dict": state,
            **extra,
        },
        path,
    )


def load_compressed(path: str | os.PathLike) -> tuple[nn.Module, Policy]:
    """Rebuild a model saved by ``save_compressed``: fresh net, ``apply_policy``, state_dict."""
    data = read_checkpoint(path)
    if data.get("kind") != "compressed" or "policy" not in data:
        raise RlMtdError(f"{path} is not a compressed checkpoint (no policy inside)")
    policy = Policy.from_dict(data["policy"], source=str(path))
    base = build_vgg(policy.net, num_classes=policy.num_classes, width=policy.width)
    model = apply_policy(base, policy, factorize=False)
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise RlMtdError(f"{path}: the weights do not fit the policy inside it ({exc})") from None
    return model, policy
