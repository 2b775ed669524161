"""CIFAR-style VGG networks built from data (one cfg list per model, ``"M"`` for pooling)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from rl_mtd.errors import RlMtdError

# torchvision's cfgs, keyed by readable names.
CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
    "vgg19": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}

NET_NAMES = tuple(CFGS)


def check_net_name(name: str) -> str:
    """Return ``name`` if it is a known net, else raise with a "did you mean"."""
    if isinstance(name, str) and name in CFGS:
        return name
    close = difflib.get_close_matches(str(name).lower(), NET_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RlMtdError(f"unknown net {name!r}; choose one of {', '.join(NET_NAMES)}.{hint}")


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: which VGG, at which width, for how many classes."""

    net: str
    width: float
    num_classes: int = 10


def model_spec(model: nn.Module) -> ModelSpec | None:
    """The spec of a model built by ``build_vgg`` (None for any other module)."""
    spec = getattr(model, "spec", None)
    return spec if isinstance(spec, ModelSpec) else None


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def scaled_channels(channels: int, width: float) -> int:
    """Channels of a layer at ``width`` (at least 1)."""
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """VGG for 32x32 inputs: 3x3 conv + BatchNorm + ReLU blocks, five max-pools, a linear head."""

    spec: ModelSpec | None = None
    """Set by ``build_vgg``: the net name, width and classes this model was built as."""

    def __init__(self, cfg: list[int | str], *, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_ch = scaled_channels(int(v), width)
            # No conv bias: the BatchNorm after it has its own shift.
            layers += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def build_vgg(name: str, num_classes: int = 10, width: float = 1.0) -> VGG:
    """Build a CIFAR VGG (``vgg11 vgg13 vgg16 vgg19``) whose channels are scaled by ``width``."""
    check_net_name(name)
    if not (width > 0):
        raise RlMtdError(f"width must be > 0, got {width!r}")
    if int(num_classes) < 2:
        raise RlMtdError(f"num_classes must be >= 2, got {num_classes!r}")
    model = VGG(CFGS[name], num_classes=int(num_classes), width=float(width))
    model.spec = ModelSpec(name, float(width), int(num_classes))
    return model
