"""The environment: one step per conv layer, each action a decomposition method and a level."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from rl_mtd.budget import (
    DEFAULT_LEVELS,
    Budget,
    BudgetMeter,
    check_levels,
    check_methods,
    check_target,
    settle,
)
from rl_mtd.budget_table import BudgetTable
from rl_mtd.decompose import METHODS, conv_layers, layer_params
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import macs_by_layer
from rl_mtd.policy import Policy
from rl_mtd.proxy import Scorer
from rl_mtd.settle import SettlePoints, check_settle_first, check_settle_points

N_STATIC = 8  # index, in, out, kernel, stride, feature map, params, MACs
N_STATE = 6  # budget used, budget left, MACs budget left, remaining share, previous method, level


@dataclass
class EnvConfig:
    """Settings of ``MixedDecompositionEnv``."""

    methods: tuple[str, ...] = METHODS
    """Methods the agent may pick, from ``keep tucker2 cp``."""
    levels: tuple[float, ...] = DEFAULT_LEVELS
    """Per-layer parameter reduction factors, weakest first."""
    target_ratio: float | None = 32.0
    """Whole-model parameter reduction target (budget mode); None for no parameter limit."""
    target_macs: float | None = None
    """Whole-model MACs reduction target (budget mode); None for no MACs limit. With no target
    the environment is in trade-off mode."""
    target_latency: float | None = None
    """Whole-model speed-up target, predicted by the environment's ``latency_model`` (budget
    mode); None for no latency limit."""
    beyond_target_weight: float = 0.0
    """Budget mode: reward per doubling of compression beyond a target. 0 by default, so
    policies are compared at the budget: a bonus made the agent overshoot (10.8x for an 8x
    target), comparing it at a harder budget than the strategies it was measured against."""
    tradeoff_weight: float = 0.05
    """Trade-off mode: reward per doubling of compression."""
    settle_first: tuple[int, ...] = ()
    """Budget mode: the layers whose ranks a finished episode's settling raises first
    (``rl_mtd.budget.settle``; then the others, last layer first). A search warm-started from
    the sensitivity heuristic takes the heuristic's order (its policy's ``meta["settle_first"]``),
    so the heuristic's options give its very policy back."""
    settle_points: SettlePoints = ()
    """Budget mode: a sensitivity study's accuracy curves; when given, settling raises ranks
    one step at a time where they predict the most accuracy per share of the budget instead
    (``rl_mtd.settle``). A search warm-started from the heuristic takes its policy's
    ``meta["settle_points"]``."""

    def __post_init__(self) -> None:
        self.methods = check_methods(self.methods)
        self.levels = check_levels(self.levels)
        budget = Budget(self.target_ratio, self.target_macs)  # checks both
        self.target_ratio, self.target_macs = budget.params, budget.macs
        if self.target_latency is not None:
            self.target_latency = check_target(self.target_latency, "target speed-up")
        self.settle_first = check_settle_first(self.settle_first)
        self.settle_points = check_settle_points(self.settle_points)

    @property
    def budget(self) -> Budget:
        """Parameters and MACs only: a latency target needs the environment's latency model
        (``MixedDecompositionEnv.budget``)."""
        return Budget(self.target_ratio, self.target_macs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MixedDecompositionEnv(gym.Env):
    """Choose, layer by layer, how to decompose a CNN's convolutions.

    ## Description
    One episode walks through the network's conv layers in forward order. At each layer the agent
    picks a method (``keep``, ``tucker2`` or ``cp``) and a level: the factor by which the layer's
    parameters should shrink. After the last layer the whole policy is scored by the proxy
    (``rl_mtd.proxy.Proxy`` or another scorer): accuracy on the proxy split after a BatchNorm re-estimate and, when
    its config asks for one, a short seeded repair (a few hundred SGD steps on training batches).

    ## Action Space
    ``Discrete(len(methods) * len(levels))``; action ``a`` means method ``methods[a // L]`` at
    level ``levels[a % L]`` (``L = len(levels)``). For ``keep`` the level is ignored. The rank for
    a level is ``rank_for_ratio(conv, method, level)``, so both methods meet one budget.

    ## Observation Space
    ``Box(0, 1, (14 + K,), float32)``, ``K`` the columns of ``layer_scores`` (0 without).
    Static layer features, each min-max normalised over the network's conv layers: 0 index,
    1 in channels, 2 out channels, 3 kernel size, 4 stride, 5 input feature-map size,
    6 parameters, 7 MACs; then the current layer's row of ``layer_scores`` (8 .. 7 + K).
    Episode state, from ``8 + K`` on: budget used (compressed parameters chosen so far /
    original model parameters), budget left (parameters still allowed under the target /
    original parameters; 0 without a parameter target), MACs budget left (MACs still allowed
    under ``target_macs`` / original MACs; without one, the predicted time still allowed under
    ``target_latency`` / the original's; else 0), share of the original conv
    parameters in this and later layers, previous method index / (methods - 1), previous level
    index / (levels - 1).

    ## Rewards
    0 on every step but the last. On the last, with ``a`` the proxy accuracy, ``a0`` the
    baseline's proxy accuracy (both 0..1), ``c`` the whole-model parameter reduction and ``m``
    the whole-model MACs reduction:
    - budget mode (``target_ratio`` T and/or ``target_macs`` M set): ``(a - a0)``, plus
      ``beyond_target_weight * log2(c / T)`` for ``c > T`` and the same for ``m > M`` (0 by
      default; the wall below keeps ``c >= T`` and ``m >= M``);
    - trade-off mode (neither set): ``(a - a0) + tradeoff_weight * log2(c)``.

    ## Budget wall (budget mode)
    After each action, if the layers still to come could not meet every target even at their
    smallest options, this layer's level is raised just enough (AMC's "action wall"; a ``keep``
    becomes the first decomposition method that fits). ``info["action"]`` is the action actually
    taken, ``info["requested_action"]`` the agent's. The finished policy is then settled at the
    budget: the levels overshoot it, so ranks are raised (the config's ``settle_first`` layers
    first, then the others last layer first) while every target holds
    (``rl_mtd.budget.settle``), and policies are scored at the target.

    ## Episode End
    Terminates after the last conv layer; never truncated. ``info`` on the last step carries the
    policy (``info["policy"]``, a dict) and the proxy's result (``info["proxy"]``), and with a
    latency target the latency model's predicted speed-up (``info["predicted_speedup"]``).

    ## Arguments
    ``scorer``: scores a finished policy (a ``rl_mtd.proxy.Proxy``, or anything with ``model``,
    ``spec``, ``baseline_acc`` and ``evaluate(policy)``); ``config``: an ``EnvConfig``;
    ``table``: the per-layer options (default: built from ``scorer.model`` and the config's
    methods and levels; one table can serve many environments); ``layer_scores``: optional
    per-layer features in 0..1, one row per conv layer, shown with the current layer (e.g.
    ``SensitivityStudy.scores``: what compressing that layer alone costs at each option);
    ``latency_model``: a ``rl_mtd.latency.LatencyModel`` of ``scorer.model`` on the target
    device, required with ``target_latency`` (the wall and settling then hold the predicted
    speed-up too).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        scorer: Scorer,
        config: EnvConfig | None = None,
        *,
        table: BudgetTable | None = None,
        layer_scores: np.ndarray | None = None,
        latency_model: Any = None,
    ):
        super().__init__()
        self.scorer = scorer
        self.config = config or EnvConfig()
        if self.config.target_latency is not None and latency_model is None:
            raise RlMtdError(
                "target_latency needs a latency model of the network on the target device "
                "(latency_model=rl_mtd.latency.LatencyModel(model, ...))"
            )
        self.budget = Budget(
            self.config.target_ratio,
            self.config.target_macs,
            self.config.target_latency,
            latency_model if self.config.target_latency is not None else None,
        )
        self.methods = self.config.methods
        self.levels = self.config.levels
        self.action_space = spaces.Discrete(len(self.methods) * len(self.levels))
        if table is None:
            table = BudgetTable(scorer.model, self.methods, self.levels)
        elif (table.methods, table.levels) != (self.methods, self.levels):
            raise RlMtdError(
                f"the budget table offers {table.methods} x {table.levels}, the config "
                f"{self.methods} x {self.levels}; build the table from the same settings"
            )
        self.table = table
        self.table.check_target(self.budget)
        self.max_ratio = self.table.max_ratio
        self.params_original = self.table.params_original
        self._static = self._describe_layers()
        if layer_scores is not None:
            scores = np.asarray(layer_scores, dtype=np.float32)
            if scores.ndim != 2 or scores.shape[0] != len(self._static):
                raise RlMtdError(
                    f"layer_scores must have one row per conv layer ({len(self._static)}), "
                    f"got shape {scores.shape}"
                )
            if not np.isfinite(scores).all():
                raise RlMtdError("layer_scores must be finite")
            self._static = np.concatenate([self._static, np.clip(scores, 0.0, 1.0)], axis=1)
        self.observation_space = spaces.Box(
            0.0, 1.0, (self._static.shape[1] + N_STATE,), dtype=np.float32
        )
        self._i = 0
        self._choices: list[tuple[int, int]] = []
        self._meter: BudgetMeter | None = None  # built at the first finished budget episode

    # ----------------------------------------------------------------- setup
    def _describe_layers(self) -> np.ndarray:
        """Min-max normalised static features, one row per conv layer."""
        sizes: dict[str, int] = {}
        hooks = []
        convs = conv_layers(self.scorer.model)
        for name, conv in convs:

            def record(_module, inputs, name=name):
                sizes[name] = inputs[0].shape[-1]

            hooks.append(conv.register_forward_pre_hook(record))
        try:
            macs = macs_by_layer(self.scorer.model)  # the same pass records each conv's input size
        finally:
            for h in hooks:
                h.remove()
        rows = [
            [
                idx,
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size[0],
                conv.stride[0],
                sizes[name],
                layer_params(conv),
                macs[name],
            ]
            for idx, (name, conv) in enumerate(convs)
        ]
        table = np.asarray(rows, dtype=np.float64)
        span = table.max(0) - table.min(0)
        static = np.where(span > 0, (table - table.min(0)) / np.where(span > 0, span, 1), 0.0)
        return static.astype(np.float32)

    # ----------------------------------------------------------------- gym API
    def _obs(self) -> np.ndarray:
        i = min(self._i, self.num_layers - 1)
        used = self.table.used(self._choices)
        budget = self.budget
        left = macs_left = 0.0
        if budget.params is not None:
            left = max(0.0, self.params_original / budget.params - used) / self.params_original
        if budget.macs is not None:
            macs0 = self.table.macs_original
            macs_left = max(0.0, macs0 / budget.macs - self.table.used_macs(self._choices)) / macs0
        elif budget.latency is not None:  # the same slot: the predicted time still allowed
            lm = budget.latency_model
            costs = self.table.latency_costs(lm)
            used_ms = lm.rest_ms + sum(costs[k][c] for k, c in enumerate(self._choices))
            macs_left = max(0.0, lm.original_ms / budget.latency - used_ms) / lm.original_ms
        remaining = (
            sum(lay.original for lay in self.table.layers[self._i :]) / self.table.conv_original
        )
        if self._choices:
            pm, pl = self._choices[-1]
            prev = [pm / max(1, len(self.methods) - 1), pl / max(1, len(self.levels) - 1)]
        else:
            prev = [0.0, 0.0]
        state = [
            min(1.0, used / self.params_original),
            min(1.0, left),
            min(1.0, macs_left),
            remaining,
            *prev,
        ]
        return np.clip(np.concatenate([self._static[i], np.asarray(state, np.float32)]), 0, 1)

    def decode(self, action: int) -> tuple[int, int]:
        """``(method index, level index)`` of an action."""
        a = int(action)
        if not 0 <= a < self.action_space.n:
            raise ValueError(f"action {action} outside 0..{self.action_space.n - 1}")
        return divmod(a, len(self.levels))

    def encode(self, method_index: int, level_index: int) -> int:
        return method_index * len(self.levels) + level_index

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._i = 0
        self._choices = []
        return self._obs(), {}

    def step(self, action):
        if self._i >= self.num_layers:
            raise RuntimeError("episode is over; call reset()")
        requested = self.decode(action)
        choice = self.table.wall(self._choices, requested, self.budget)
        layer = self.table.layers[self._i]
        self._choices.append(choice)
        info: dict[str, Any] = {
            "layer": layer.name,
            "requested_action": self.encode(*requested),
            "action": self.encode(*choice),
            "method": self.methods[choice[0]],
            "level": self.levels[choice[1]],
            "wall": choice != requested,
        }
        self._i += 1
        terminated = self._i == self.num_layers
        reward = 0.0
        if terminated:
            policy = self.current_policy()
            result = self.scorer.evaluate(policy)
            reward = self.reward(result.accuracy, result.compression_ratio, result.macs_ratio)
            info.update(
                policy=policy.to_dict(),
                proxy=result.to_dict(),
                reward=reward,
                baseline_acc=self.scorer.baseline_acc,
            )
            if self.budget.latency_model is not None:
                info["predicted_speedup"] = self.budget.latency_model.speedup(policy.choices())
        return self._obs(), float(reward), terminated, False, info

    # ----------------------------------------------------------------- helpers
    def reward(self, accuracy: float, ratio: float, macs_ratio: float | None = None) -> float:
        gain = accuracy - self.scorer.baseline_acc
        budget, weight = self.budget, self.config.beyond_target_weight
        if not budget.active:
            return gain + self.config.tradeoff_weight * math.log2(ratio)
        if budget.params is not None:
            gain += weight * max(0.0, math.log2(ratio / budget.params))
        if budget.macs is not None and macs_ratio is not None:
            gain += weight * max(0.0, math.log2(macs_ratio / budget.macs))
        return gain

    def current_policy(self) -> Policy:
        """The choices so far as a policy; a finished episode in budget mode is settled at the
        budget (``rl_mtd.budget.settle``: the levels overshoot, so ranks are raised, by the
        config's ``settle_points`` or its ``settle_first`` layers first, while every target
        still holds)."""
        spec = self.scorer.spec
        choices = self.table.to_choices(self._choices)
        if self.budget.active and len(self._choices) == self.num_layers:
            if self._meter is None:
                self._meter = BudgetMeter(self.scorer.model, self.budget)
            choices = settle(
                self._meter, choices, self.config.settle_first, self.config.settle_points
            )
        return Policy.from_choices(
            self.scorer.model,
            choices,
            net=spec.net,
            width=spec.width,
            num_classes=spec.num_classes,
            meta=self.budget.meta(),
        )

    @property
    def num_layers(self) -> int:
        return len(self.table.layers)
