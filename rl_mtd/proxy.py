"""The quick proxy that scores a policy: compression and accuracy, on the GPU when there is one.

``Proxy.evaluate(policy)``: apply the policy from cached factors, re-estimate BatchNorm statistics
on a few training batches (no gradients), optionally run a short seeded "repair" (a few SGD steps
on training batches), and measure top-1 on the proxy split (carved
from the training images; never the test split). Results are memoised by the per-layer choices,
and the baseline is measured once.

Why the repair: at high compression most policies score near chance straight after decomposition,
BN re-estimate or not, so the ranking among them is noise.
A couple of hundred SGD steps separate the
policies that fine-tuning can rescue from those it cannot (BENCHMARKS.md, proxy fidelity).

``ProxyConfig(fit="data")`` fits the factors to each layer's output error on the baseline's own
activations (input moments of ``fit_images`` training images, collected once) instead of to the
kernels (``rl_mtd.datafit``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol

import torch
from torch import nn

from rl_mtd.data import Split
from rl_mtd.datafit import shrink_to_identity
from rl_mtd.decompose import FactorCache, collect_input_moments, conv_layers, weight_key
from rl_mtd.errors import RlMtdError
from rl_mtd.evaluation import evaluate, reestimate_bn
from rl_mtd.metrics import count_macs, count_params
from rl_mtd.models import ModelSpec, model_spec
from rl_mtd.policy import Policy, apply_policy
from rl_mtd.train import TrainConfig, train

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when there is one; asking for CUDA without one is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RlMtdError(
            f"--device {dev} was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RlMtdError(
            f"--device {dev} was asked for but only {torch.cuda.device_count()} CUDA GPU(s) are "
            "visible (cuda:0 is the first); use --device cuda"
        )
    return dev


@dataclass
class ProxyResult:
    accuracy: float
    compression_ratio: float
    """Parameters of the whole original model / of the whole compressed model."""
    macs_ratio: float
    params: int
    macs: int
    seconds: float
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def default_repair() -> TrainConfig:
    """The repair's training settings: plain cross-entropy (it ranked policies better than
    distillation at kd 0.9 in the fidelity study), peak lr 0.01 on a cosine schedule."""
    return TrainConfig(lr=0.01, schedule="cosine", batch_size=128)


FITS = ("weights", "data")


@dataclass
class ProxyConfig:
    bn_batches: int = 10
    """Training batches for the BatchNorm re-estimate (0 turns it off)."""
    bn_batch_size: int = 128
    eval_batch_size: int = 1000
    repair_steps: int = 0
    """SGD steps of fine-tuning before measuring (0 turns the repair off)."""
    repair: TrainConfig = field(default_factory=default_repair)
    """How the repair trains (its ``epochs``, ``steps`` and ``seed`` are set by the proxy);
    ``kd_alpha`` > 0 distils from the baseline."""
    seed: int = 0
    """Seeds the BatchNorm batches and the repair: every policy sees the same data."""
    fit: str = "weights"
    """How factors are fitted: ``weights`` (minimise each kernel's error) or ``data`` (minimise
    each layer's output error on the baseline's own activations, ``rl_mtd.datafit``)."""
    fit_images: int = 512
    """Training images the input moments of ``fit="data"`` are collected from."""
    fit_shrink: float = 0.0
    """``fit="data"``: each input moment shrunk this far towards a multiple of the identity
    (``rl_mtd.datafit.shrink_to_identity``; 0 the data alone, 1 the weight-only fit)."""

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise RlMtdError(f"unknown fit {self.fit!r}; choose one of {', '.join(FITS)}")
        if isinstance(self.fit_images, bool) or not isinstance(self.fit_images, int):
            raise RlMtdError(f"fit_images must be an int, got {self.fit_images!r}")
        if self.fit_images < 1:
            raise RlMtdError(f"fit_images must be >= 1, got {self.fit_images}")
        if not 0.0 <= self.fit_shrink <= 1.0:
            raise RlMtdError(f"fit_shrink must be in [0, 1], got {self.fit_shrink}")
        if self.fit_shrink and self.fit != "data":
            raise RlMtdError("fit_shrink applies to fit='data' only; leave it at 0 or fit to data")
        if self.bn_batches < 0 or self.repair_steps < 0:
            raise RlMtdError(
                f"bn_batches and repair_steps must be >= 0, got {self.bn_batches} and "
                f"{self.repair_steps}"
            )
        if self.bn_batch_size < 1 or self.eval_batch_size < 1:
            raise RlMtdError("bn_batch_size and eval_batch_size must be >= 1")


class Scorer(Protocol):
    """What the environment needs from whatever scores its policies."""

    model: nn.Module
    """The uncompressed baseline the policies are made for."""
    spec: ModelSpec
    baseline_acc: float
    """The baseline's own score (0..1), the reference of the reward."""

    def evaluate(self, policy: Policy) -> ProxyResult: ...


class Proxy:
    """Scores policies on one baseline model; memoises by policy."""

    def __init__(
        self,
        model: nn.Module,
        *,
        train_split: Split,
        proxy_split: Split,
        device: str | torch.device | None = "auto",
        config: ProxyConfig | None = None,
        cache: FactorCache | None = None,
        net: str | None = None,
        width: float | None = None,
    ):
        if len(proxy_split) == 0:
            raise RlMtdError("the proxy split is empty; give it some images (--proxy-size)")
        self.device = resolve_device(device)
        self.config = config or ProxyConfig()
        self.model = model.to(self.device).eval()
        built = model_spec(model)
        if net is None and built is None:
            raise ValueError("pass net=...: the model does not say which VGG it is")
        head = getattr(model, "classifier", None)
        self.spec = ModelSpec(
            net or built.net,  # type: ignore[union-attr]
            float(width if width is not None else (built.width if built else 1.0)),
            int(getattr(head, "out_features", 10)),
        )
        self.net, self.width, self.num_classes = (
            self.spec.net,
            self.spec.width,
            self.spec.num_classes,
        )
        self.train_split = train_split.to(self.device)
        self.proxy_split = proxy_split.to(self.device)
        self.cache = cache
        self.convs = conv_layers(self.model)
        self.wkeys = [weight_key(c.weight) for _, c in self.convs]  # hashed once, not per episode
        self.input_moments: dict[str, torch.Tensor] | None = None
        if self.config.fit == "data":  # the baseline's own activations, collected once
            moments = collect_input_moments(
                self.model,
                self.train_split,
                images=self.config.fit_images,
                batch_size=self.config.bn_batch_size,
                seed=self.config.seed,
            )
            shrink = self.config.fit_shrink
            self.input_moments = {k: shrink_to_identity(m, shrink) for k, m in moments.items()}
        self.params_original = count_params(self.model)
        self.macs_original = count_macs(self.model)
        self._memo: dict[tuple, ProxyResult] = {}
        self.evaluations = 0  # real (non-memoised) evaluations
        self.baseline_acc = evaluate(
            self.model, self.proxy_split, batch_size=self.config.eval_batch_size
        )

    @staticmethod
    def policy_key(policy: Policy) -> tuple:
        return tuple((c.method, c.rank) for c in policy.layers)

    def compress(self, policy: Policy) -> nn.Module:
        """The compressed model with re-estimated BatchNorm statistics (when configured)."""
        model = apply_policy(
            self.model,
            policy,
            cache=self.cache,
            wkeys=self.wkeys,
            input_moments=self.input_moments,
        )
        if self.config.bn_batches > 0 and any(c.method != "keep" for c in policy.layers):
            reestimate_bn(
                model,
                self.train_split,
                batches=self.config.bn_batches,
                batch_size=self.config.bn_batch_size,
                seed=self.config.seed,
            )
        return model.eval()

    def evaluate(self, policy: Policy) -> ProxyResult:
        key = self.policy_key(policy)
        if key in self._memo:
            hit = self._memo[key]
            return ProxyResult(**{**hit.to_dict(), "cached": True})
        t0 = time.perf_counter()
        model = self.compress(policy)
        if any(c.method != "keep" for c in policy.layers):
            self.repair(model)  # a no-op with repair_steps 0
        acc = evaluate(model, self.proxy_split, batch_size=self.config.eval_batch_size)
        params, macs = count_params(model), count_macs(model)
        result = ProxyResult(
            accuracy=acc,
            compression_ratio=self.params_original / params,
            macs_ratio=self.macs_original / macs,
            params=params,
            macs=macs,
            seconds=time.perf_counter() - t0,
        )
        self._memo[key] = result
        self.evaluations += 1
        return result

    def repair(self, model: nn.Module) -> None:
        """A short seeded fine-tune, in place: the same steps and batches for every policy."""
        c = self.config
        if c.repair_steps == 0:
            return
        batch = min(c.repair.batch_size, len(self.train_split))
        config = replace(c.repair, steps=c.repair_steps, batch_size=batch, seed=c.seed)
        teacher = self.model if config.uses_teacher else None
        train(model, self.train_split, config=config, teacher=teacher, desc="proxy repair")
        model.eval()
