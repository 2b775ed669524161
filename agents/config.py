"""The one configuration of a run: every setting, its documentation and its checks (the presets' values are in ``agents.presets``)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.presets import PRESETS, REPAIR_STEPS, study_steps
from rl_mtd.budget import DEFAULT_LEVELS, check_levels, check_methods, check_target
from rl_mtd.decompose import METHODS
from rl_mtd.errors import RlMtdError
from rl_mtd.models import check_net_name

DEVICES = ("auto", "cpu", "cuda")
ON_INTERRUPT = ("ask", "report", "stop")
FITS = ("weights", "data")
EXPORTS = ("onnx", "torchscript")
WARM_STARTS = ("none", "sensitivity")
OBSERVES = ("layer", "study")


@dataclass
class RunConfig:
    """Every setting of one ``run_agent.py`` run (written to ``config.json``)."""

    net: str = "vgg16"
    """Network: vgg11, vgg13, vgg16 or vgg19."""
    width: float = 1.0
    """Channel width multiplier (0.125 for tests, 1.0 for the real nets)."""
    data: str | None = None
    """Dataset source: a torchvision CIFAR-10 folder, an ImageFolder dir/.tar.gz/.zip, 'synthetic'
    or None for $RL_MTD_DATA, else torchvision's download."""
    checkpoint: str | None = None
    """Baseline checkpoint; None trains one (cached under the cache directory)."""
    out: str | None = None
    """Run directory; None means runs/<net>-<time>."""
    overwrite: bool = False
    dry_run: bool = False
    """Print the plan and its time estimate, then stop before any work (nothing is written)."""
    preset: str = "paper"
    device: str = "auto"
    seed: int = 0
    # budgets (set by the preset unless given)
    baseline_epochs: float = 60
    train_size: int | None = None
    proxy_size: int = 5000
    test_size: int | None = None
    episodes: int = 600
    """Search length in episodes (timesteps = episodes x conv layers unless --timesteps)."""
    timesteps: int | None = None
    bn_batches: int = 20
    repair_steps: int = REPAIR_STEPS
    """SGD steps (cross-entropy, seeded) on each policy before the proxy scores it."""
    study_repair_steps: int | None = None
    """Repair steps of each entry of the sensitivity study (``--warm-start sensitivity``,
    ``--observe study``); None: ``STUDY_REPAIR_STEPS`` or ``repair_steps``, whichever is fewer.
    Fewer make the study, which is charged to the search, cheaper
    (``benchmarks/study_probe.py`` measures what that changes)."""
    finetune_epochs: float = 60
    latency_repeats: int = 20
    # search
    target_ratio: float | None = 32.0
    """Whole-model parameter compression target; None for no parameter limit."""
    target_macs: float | None = None
    """Whole-model MACs reduction target; None for no MACs limit. With no target at all the
    search is in the accuracy/size trade-off mode."""
    target_latency: float | None = None
    """Whole-model speed-up target on the run's device at ``latency_batch``, as predicted by a
    per-layer latency model measured there (``rl_mtd.latency``); None for no latency limit."""
    latency_batch: int = 1
    """Batch size the latency budget is for."""
    methods: tuple[str, ...] = METHODS
    levels: tuple[float, ...] = DEFAULT_LEVELS
    n_envs: int = 1
    # training
    lr: float = 0.05
    finetune_lr: float = 0.02
    """Peak fine-tuning learning rate (cosine schedule). 0.02 by measurement: over 20 epochs
    it beat 0.01 by 0.24 points at 8x and 0.51 at 16x (3 seeds each, BENCHMARKS.md)."""
    finetune_weight_decay: float = 5e-4
    """Weight decay of the fine-tune (on every weight but BatchNorm's and biases)."""
    finetune_label_smoothing: float = 0.0
    """Label smoothing of the fine-tune's cross-entropy (the baseline trains with 0.1)."""
    batch_size: int = 128
    export: str | None = None
    """Also write the compressed model's inference form: "onnx" (model.onnx) or "torchscript"
    (model.torchscript.pt); None writes neither."""
    warm_start: str = "none"
    """``sensitivity``: start the search from the MTD sensitivity heuristic (its study cached per
    baseline; behaviour cloning towards its actions; its policy the first best). ``none``: from
    a uniform agent."""
    warm_start_prob: float = 0.85
    """With ``--warm-start sensitivity``: behaviour cloning stops when the agent picks the
    heuristic's actions with this mean probability (higher: episodes stay closer to it; 0.85
    measured in BENCHMARKS.md's 16x comparison)."""
    imitate_best: bool = False
    """Self-imitation: at the start of every rollout after a new best policy was found, clone
    the agent towards that policy's actions (to ``warm_start_prob``), so its episodes explore
    around the best so far rather than drift from it; PPO's updates in between shape which
    departures it tries."""
    observe: str = "layer"
    """What the agent sees of each layer: "layer" (its shape, size and the budget state) or
    "study" (also the sensitivity study's accuracy loss at each method and level for that layer
    alone; the study is run once per baseline, cached, and its cost charged to the search)."""
    fit: str = "weights"
    """How layers are factorised: "weights" (the kernel alone) or "data" (the output error on the
    baseline's own activations of a few hundred training images); one setting for the proxy, the
    strategies and the final model."""
    kd: float = 0.0
    """Distillation weight from the baseline during fine-tuning (0: off)."""
    feature_kd: float = 1.0
    """Feature distillation weight during fine-tuning: each decomposed block's output against
    the baseline layer it replaces (0: off). 1 by measurement: the fine-tune sweep of
    BENCHMARKS.md (16x, 2 seeds) gained 1.3 points over plain fine-tuning, more than logit
    distillation (--kd 0.5, +1.1) or either learning rate tried."""
    stages: int = 1
    """Compress in this many stages (ranks shrinking geometrically to the policy's, the
    fine-tune epochs split between them, fine-tuned blocks re-factorised); 1 is one-shot."""
    final_check: int = 0
    """Choose the policy to fine-tune among the search's this many best distinct candidates by
    short fine-tunes (``agents.final_check``; 0 or 1: the search's best as it is). Its time
    counts as search time."""
    final_check_epochs: float = 3.0
    """Fine-tune epochs per candidate of the final check (annealed to zero over them)."""
    final_check_margin: float = 2.0
    """The final check leaves the policy the search started from (``--warm-start sensitivity``)
    only where the best candidate beats it on the same held-out images by more than this many
    paired standard errors (0: for any lead)."""
    # replay / resume
    replay: str | None = None
    resume: str | None = None
    search_more: bool = False
    """Set by ``--resume`` given ``--episodes`` or ``--timesteps``: search on even where the
    saved search had finished (``--episodes``: up to that total)."""
    on_interrupt: str = "ask"
    progress: bool = True
    argv: list[str] = field(default_factory=list)

    @classmethod
    def with_preset(cls, preset: str, **overrides: Any) -> RunConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=preset, **values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"], d["levels"] = list(self.methods), list(self.levels)
        return d

    def validate(self) -> RunConfig:
        """Check every setting; the one place a run's settings are checked.

        Cheap and free of side effects: no file is read (beyond existence) and nothing is
        written, so a bad value stops the run before data, training or the run directory.
        """
        check_net_name(self.net)
        if self.preset not in PRESETS:
            raise RlMtdError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise RlMtdError(
                f"--device {self.device!r}: choose one of {', '.join(DEVICES)} or cuda:N"
            )
        if self.on_interrupt not in ON_INTERRUPT:
            raise RlMtdError(
                f"--on-interrupt {self.on_interrupt!r}: choose one of {', '.join(ON_INTERRUPT)}"
            )
        _positive("--width", self.width)
        if not MIN_WIDTH <= self.width <= MAX_WIDTH:
            raise RlMtdError(
                f"--width {self.width:g} is outside {MIN_WIDTH:g}..{MAX_WIDTH:g}: 1 is the real "
                "network, 0.25 a quick CPU-sized one, 0.125 what the tests use (below 1/64 the "
                "first layers would have under one channel; above 8 the net needs tens of GB)"
            )
        if self.target_ratio is not None:
            check_target(self.target_ratio, "--target-ratio")
        if self.target_macs is not None:
            check_target(self.target_macs, "--target-macs")
        if self.target_latency is not None:
            check_target(self.target_latency, "--target-latency")
            if self.n_envs != 1:
                raise RlMtdError(
                    "--target-latency times the layers in this process, and worker processes "
                    "would time them again under other loads; use it with --n-envs 1"
                )
        check_methods(self.methods)
        check_levels(self.levels, "--levels")
        for flag, value in (
            ("--episodes", self.episodes),
            ("--n-envs", self.n_envs),
            ("--proxy-size", self.proxy_size),
            ("--batch-size", self.batch_size),
            ("--latency-repeats", self.latency_repeats),
            ("--stages", self.stages),
            ("--latency-batch", self.latency_batch),
        ):
            _at_least(flag, value, 1)
        if self.stages > 1 and self.fit == "data":
            raise RlMtdError(
                "--stages re-factorises fine-tuned blocks by their kernels alone; use it with "
                "--fit weights (the default)"
            )
        if not (
            isinstance(self.finetune_weight_decay, int | float)
            and 0 <= self.finetune_weight_decay < math.inf
        ):
            raise RlMtdError(
                f"--finetune-weight-decay must be a number >= 0, got {self.finetune_weight_decay!r}"
            )
        if not (
            isinstance(self.finetune_label_smoothing, int | float)
            and 0 <= self.finetune_label_smoothing < 1
        ):
            raise RlMtdError(
                "--finetune-label-smoothing must be in [0, 1), got "
                f"{self.finetune_label_smoothing!r}"
            )
        if not (isinstance(self.feature_kd, int | float) and 0 <= self.feature_kd < math.inf):
            raise RlMtdError(
                f"--feature-kd must be a number >= 0 (0 turns it off), got {self.feature_kd!r}"
            )
        for flag, value in (
            ("--timesteps", self.timesteps),
            ("--train-size", self.train_size),
            ("--test-size", self.test_size),
        ):
            if value is not None:
                _at_least(flag, value, 1)
        if self.train_size is not None and self.train_size < self.batch_size:
            raise RlMtdError(
                f"--train-size {self.train_size} is smaller than one batch of {self.batch_size}; "
                "raise --train-size or lower --batch-size"
            )
        _at_least("--seed", self.seed, 0)
        if self.seed >= 2**32:
            raise RlMtdError(f"--seed must be below 2**32, got {self.seed}")
        _at_least("--bn-batches", self.bn_batches, 0)
        _at_least("--repair-steps", self.repair_steps, 0)
        if self.study_repair_steps is not None:
            _at_least("--study-repair-steps", self.study_repair_steps, 0)
            if self.replay is not None:
                raise RlMtdError(
                    "--study-repair-steps sets the study a search measures; a replay measures "
                    "the one its agent was trained with: drop --study-repair-steps"
                )
            if not self.measures_study:
                raise RlMtdError(
                    "--study-repair-steps applies to the sensitivity study, which this run does "
                    "not measure; add --warm-start sensitivity or --observe study, or drop it"
                )
        _at_least("--final-check", self.final_check, 0)
        if self.final_check > 1 and not self.has_budget:
            raise RlMtdError(
                "--final-check compares candidates of one budget by accuracy; in --tradeoff "
                "mode they differ in size, and accuracy alone would keep the largest. Give a "
                "--target-ratio, --target-macs or --target-latency"
            )
        if self.final_check > 1 and self.replay is not None:
            raise RlMtdError(
                "--final-check chooses among a search's best candidates, and --replay applies "
                "one given policy or agent; drop one of them"
            )
        most = self.most_candidates
        if self.final_check > most and self.timesteps is None:
            fix = (
                f"--episodes {self.final_check - most + self.episodes} or more"
                if self.resume is not None
                else f"--final-check {most} or less, or more --episodes"
            )
            raise RlMtdError(
                f"--final-check {self.final_check} asks for more candidates than a search of "
                f"{self.episodes} episodes gives (at most {most}); pass {fix}"
            )
        if not (math.isfinite(self.final_check_margin) and self.final_check_margin >= 0):
            raise RlMtdError(
                f"--final-check-margin must be a number of standard errors >= 0 (0: any lead "
                f"moves the check off the search's start), got {self.final_check_margin}"
            )
        for flag, value in (
            ("--baseline-epochs", self.baseline_epochs),
            ("--finetune-epochs", self.finetune_epochs),
            ("--final-check-epochs", self.final_check_epochs),
            ("--lr", self.lr),
            ("--finetune-lr", self.finetune_lr),
        ):
            _positive(flag, value)
        if self.export not in (None, *EXPORTS):
            raise RlMtdError(f"--export {self.export!r}: choose one of {', '.join(EXPORTS)}")
        if self.export == "onnx":
            try:
                import onnx  # noqa: F401
            except ImportError:
                raise RlMtdError(
                    '--export onnx needs the onnx package: pip install "rl-mtd[export]"'
                ) from None
        if self.warm_start not in WARM_STARTS:
            raise RlMtdError(
                f"--warm-start {self.warm_start!r}: choose one of {', '.join(WARM_STARTS)}"
            )
        if self.warm_start != "none" and not self.has_budget:
            raise RlMtdError(
                f"--warm-start {self.warm_start} needs a budget (--target-ratio, --target-macs "
                "and/or --target-latency); in trade-off mode use --warm-start none"
            )
        if not (isinstance(self.warm_start_prob, int | float) and 0 < self.warm_start_prob < 1):
            raise RlMtdError(
                f"--warm-start-prob must be between 0 and 1, got {self.warm_start_prob!r}"
            )
        if not isinstance(self.imitate_best, bool):
            raise RlMtdError(f"imitate_best must be true or false, got {self.imitate_best!r}")
        if self.observe not in OBSERVES:
            raise RlMtdError(f"--observe {self.observe!r}: choose one of {', '.join(OBSERVES)}")
        if self.fit not in FITS:
            raise RlMtdError(f"--fit {self.fit!r}: choose one of {', '.join(FITS)}")
        if not (isinstance(self.kd, int | float) and 0 <= self.kd <= 1):
            raise RlMtdError(f"--kd must be in [0, 1] (0 turns distillation off), got {self.kd!r}")
        _check_file("--checkpoint", self.checkpoint, "a baseline checkpoint (.pt)")
        _check_file("--replay", self.replay, "its policy.json or agent.zip")
        if self.resume is None and self.out is not None:
            from agents.run_dir import check_new_out  # it imports this module

            check_new_out(Path(self.out), self.overwrite)
        return self

    @property
    def measures_study(self) -> bool:
        """Whether the search measures the sensitivity study (a replay reads its agent's)."""
        return self.replay is None and (self.warm_start == "sensitivity" or self.observe == "study")

    @property
    def study_steps(self) -> int:
        """Repair steps of each sensitivity-study entry."""
        return study_steps(self.repair_steps, self.study_repair_steps)

    @property
    def most_candidates(self) -> int:
        """The most distinct candidates a search of ``episodes`` can give the final check: one
        per episode, and a warm start's policy besides."""
        return self.episodes + (self.warm_start == "sensitivity")

    @property
    def has_budget(self) -> bool:
        """Budget mode (any target set) rather than the trade-off mode."""
        return any(
            t is not None for t in (self.target_ratio, self.target_macs, self.target_latency)
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("methods", "levels"):  # a string would be read letter by letter
            if isinstance(values.get(key), str):
                raise TypeError(f"{key} must be a list, got the string {values[key]!r}")
        values["methods"] = tuple(values.get("methods", METHODS))
        values["levels"] = tuple(values.get("levels", DEFAULT_LEVELS))
        return cls(**values)


def _at_least(flag: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RlMtdError(f"{flag} must be a whole number >= {low}, got {value!r}")


def _check_file(flag: str, path: str | None, what: str) -> None:
    if path is None or Path(path).is_file():
        return
    if Path(path).is_dir():
        raise RlMtdError(f"{flag} {path} is a directory; give the file itself ({what})")
    raise RlMtdError(f"{flag} {path} does not exist")


MIN_WIDTH, MAX_WIDTH = 1 / 64, 8.0
"""The channel widths a run accepts (VGG's 64-channel first layer: at least one channel)."""


def _positive(flag: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise RlMtdError(f"{flag} must be a positive number, got {value!r}")
