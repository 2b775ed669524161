"""The argument parser of ``run_agent.py`` and the ``rl-mtd`` console script: every flag, its
help and its check of a value's form (what a value means for the run: ``agents.cli``)."""

from __future__ import annotations

import argparse
import difflib
import sys

from agents.presets import PRESETS
from rl_mtd.decompose import METHODS
from rl_mtd.models import NET_NAMES


def _preset_values(key: str) -> str:
    """What each preset sets ``key`` to, for a flag's help: "paper 600, cpu 120, smoke 16"."""

    def show(v):
        return "all" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    return "default by preset: " + ", ".join(
        f"{name} {show(PRESETS[name][key])}"
        for name in reversed(list(PRESETS))
        if key in PRESETS[name]
    )


class _Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for mistyped choices."""

    def error(self, message: str):  # type: ignore[override]
        if "invalid choice" in message:
            bad = message.split("'")[1] if "'" in message else ""
            pool = list(NET_NAMES) + list(PRESETS) + ["auto", "cpu", "cuda"]
            close = difflib.get_close_matches(bad.lower(), pool, n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        elif message.endswith("expected one argument"):
            flag = message.split()[1].rstrip(":")
            if self._dash_value(flag):
                message += f" (a value that starts with '-' needs '=': {flag}=-VALUE)"
        super().error(message)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _dash_value(self, flag: str) -> bool:
        """Whether "expected one argument" for ``flag`` came from a value starting with '-'
        (``--levels -2,4``), not from a missing value, for a flag that takes free values."""
        action = self._option_string_actions.get(flag)
        argv = getattr(self, "_argv", [])
        if action is None or action.choices is not None or flag not in argv:
            return False
        after = argv[argv.index(flag) + 1 : argv.index(flag) + 2]
        return (
            bool(after) and after[0].startswith("-") and after[0] not in self._option_string_actions
        )


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    for n in names:
        if n not in METHODS:
            close = difflib.get_close_matches(n, METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise argparse.ArgumentTypeError(
                f"unknown method {n!r}{hint}; choose from {', '.join(METHODS)}"
            )
    return names


class _Help(argparse.HelpFormatter):
    """Shows a default only where there is one and the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default in (None, argparse.SUPPRESS)
            or action.default is False
            or "default" in text
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        description="Search per-layer Tucker-2/CP decompositions of a VGG with PPO, apply the "
        "best policy, fine-tune and report.",
        formatter_class=_Help,
    )
    p.add_argument("--net", default="vgg16", choices=NET_NAMES, help="network")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 source: torchvision folder, ImageFolder "
        "dir/.tar.gz/.zip, 'synthetic'; default $RL_MTD_DATA, else download",
    )
    p.add_argument(
        "--checkpoint", default=None, help="baseline checkpoint (default: train one and cache it)"
    )
    p.add_argument("--out", default=None, help="run directory (default runs/<net>-<time>)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing --out, first clearing every file of the old run listed "
        "in README's 'What a run writes' but config.json (other files stay)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the settings, time this device and print the plan with its time estimate, "
        "then stop before any work (nothing is written to the run directory; the caches "
        "may be filled: the dataset, and layer timings for --target-latency)",
    )
    p.add_argument(
        "--preset",
        default="paper",
        choices=list(PRESETS),
        help="budgets: smoke (a pipeline check: under a minute on a 2-core CPU), cpu "
        "(an hour or two at --width 0.25 on 2 cores), paper (GPU)",
    )
    p.add_argument(
        "--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}", help="device (default auto)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for splits, training and the agent")
    g = p.add_argument_group("search")
    g.add_argument(
        "--target-ratio",
        type=float,
        default=None,
        help="whole-model parameter compression target (default 32)",
    )
    g.add_argument(
        "--target-macs",
        type=float,
        default=None,
        help="whole-model MACs reduction target, alone or with --target-ratio (the budget wall "
        "enforces both)",
    )
    g.add_argument(
        "--target-latency",
        type=float,
        default=None,
        help="whole-model speed-up target on this device at --latency-batch, alone or with the "
        "others: each conv layer is timed alone at each option (cached per machine) and the "
        "budget wall holds their predicted sum",
    )
    g.add_argument(
        "--latency-batch",
        type=int,
        default=None,
        help="batch size --target-latency is for (default 1)",
    )
    g.add_argument(
        "--tradeoff",
        action="store_true",
        help="no target: reward accuracy against log compression instead",
    )
    g.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    g.add_argument(
        "--levels",
        type=_floats,
        default=None,
        help="comma-separated per-layer reduction factors (default 2,4,...,128)",
    )
    g.add_argument(
        "--episodes",
        type=int,
        default=None,
        help=f"search episodes ({_preset_values('episodes')}); with --resume, the total "
        "including the episodes already run",
    )
    g.add_argument(
        "--timesteps",
        type=int,
        default=None,
        help="search length in env steps (overrides --episodes), run in whole PPO rollouts "
        "of 4 episodes per env: --timesteps 12 on VGG11's 8 layers runs 4 episodes",
    )
    g.add_argument(
        "--warm-start",
        default=None,
        choices=["none", "sensitivity"],
        help="start the search from the MTD sensitivity heuristic (a per-layer study, cached per "
        "baseline, then behaviour cloning; the search ends at or above it by the proxy); "
        "default: sensitivity in the cpu and paper presets, none in smoke",
    )
    g.add_argument(
        "--warm-start-prob",
        type=float,
        default=0.85,
        help="with --warm-start: how sure of the heuristic's actions the agent starts (0..1; "
        "higher keeps its episodes closer to the heuristic)",
    )
    g.add_argument(
        "--imitate-best",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="self-imitation: after every new best, clone the agent towards that policy's actions "
        "(to --warm-start-prob) so it explores around the best so far, and again whenever a "
        "rollout only repeated scored policies; default: on in the cpu "
        "and paper presets, off in smoke",
    )
    g.add_argument(
        "--observe",
        default=None,
        choices=["layer", "study"],
        help="what the agent sees of each layer: its shape and the budget (layer), or also the "
        "sensitivity study's accuracy loss at every option for that layer alone (study; the "
        "study is cached per baseline); default: study in the cpu and paper presets, layer in "
        "smoke",
    )
    g.add_argument(
        "--n-envs", type=int, default=1, help="subprocess environments; episodes run N at a time"
    )
    g.add_argument(
        "--proxy-size",
        type=int,
        default=None,
        help=f"proxy split size in images ({_preset_values('proxy_size')})",
    )
    g.add_argument(
        "--bn-batches",
        type=int,
        default=None,
        help="training batches for the BatchNorm re-estimate of each compressed model (0: keep "
        "the original statistics, an ablation: decomposed layers then score near chance; "
        f"{_preset_values('bn_batches')})",
    )
    g.add_argument(
        "--repair-steps",
        type=int,
        default=None,
        help="SGD steps on each policy "
        f"before the proxy scores it (0: BN re-estimate only; {_preset_values('repair_steps')})",
    )
    g.add_argument(
        "--study-repair-steps",
        type=int,
        default=None,
        help="repair steps of each sensitivity-study entry (--warm-start sensitivity, "
        "--observe study), a cheaper probe than the search's own (default: 50 or "
        "--repair-steps, whichever is fewer)",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--baseline-epochs",
        type=float,
        default=None,
        help=f"epochs for a new baseline ({_preset_values('baseline_epochs')})",
    )
    t.add_argument(
        "--finetune-epochs",
        type=float,
        default=None,
        help=f"fine-tuning epochs ({_preset_values('finetune_epochs')})",
    )
    t.add_argument(
        "--export",
        default=None,
        choices=["onnx", "torchscript"],
        help="also write the compressed model's inference form (BatchNorm folded, factor chains "
        "merged) as model.onnx or model.torchscript.pt, runnable without rl_mtd",
    )
    t.add_argument(
        "--fit",
        default="weights",
        choices=["weights", "data"],
        help="factorise each layer to its kernel alone, or to its outputs on the baseline's own "
        "activations (data-aware; see BENCHMARKS.md for when it helps)",
    )
    t.add_argument(
        "--kd",
        type=float,
        default=0.0,
        help="distillation weight from the baseline during fine-tuning (0 off, e.g. 0.5)",
    )
    t.add_argument(
        "--feature-kd",
        type=float,
        default=1.0,
        help="feature distillation weight: each decomposed block's output against the layer it "
        "replaces, during fine-tuning (default 1, chosen by the fine-tune sweep in "
        "BENCHMARKS.md; 0 off)",
    )
    t.add_argument(
        "--stages",
        type=int,
        default=1,
        help="compress in this many stages, fine-tuning between them (1: one-shot)",
    )
    t.add_argument(
        "--final-check",
        type=int,
        default=None,
        metavar="K",
        help="fine-tune the search's K best distinct policies briefly (--final-check-epochs) "
        "and keep the one best on held-out images (with --warm-start sensitivity the "
        "heuristic's policy is always one of the K; its time counts as search time); default: "
        "3 in the cpu and paper presets where a budget and the episodes allow, 0 (the "
        "search's best as it is) in smoke",
    )
    t.add_argument(
        "--final-check-epochs",
        type=float,
        default=None,
        help="fine-tune epochs per candidate of --final-check (default 3)",
    )
    t.add_argument(
        "--final-check-margin",
        type=float,
        default=None,
        metavar="Z",
        help="--final-check leaves the policy the search started from (--warm-start "
        "sensitivity) only where the best candidate beats it on the same held-out images by more "
        "than Z paired standard errors, not for a lead within their sampling noise (default 2; "
        "0: any lead)",
    )
    t.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
    t.add_argument(
        "--lr", type=float, default=None, help="peak learning rate of a new baseline (default 0.05)"
    )
    t.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="peak fine-tuning learning rate (default 0.02)",
    )
    t.add_argument(
        "--finetune-weight-decay",
        type=float,
        default=None,
        help="fine-tuning weight decay (default 5e-4)",
    )
    t.add_argument(
        "--finetune-label-smoothing",
        type=float,
        default=None,
        help="fine-tuning label smoothing (default 0)",
    )
    t.add_argument(
        "--latency-repeats",
        type=int,
        default=None,
        help=f"timed forward passes per latency measurement ({_preset_values('latency_repeats')})",
    )
    t.add_argument(
        "--train-size",
        type=int,
        default=None,
        help=f"use only this many training images ({_preset_values('train_size')})",
    )
    t.add_argument(
        "--test-size",
        type=int,
        default=None,
        help=f"use only this many test images ({_preset_values('test_size')})",
    )
    r = p.add_argument_group("replay and resume")
    r.add_argument(
        "--replay",
        default=None,
        help="policy.json or agent.zip to apply instead of "
        "searching; with --checkpoint to another baseline of the same net, else to "
        "the cached or newly trained one",
    )
    r.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a search, or an interrupted fine-tune; its "
        "settings come from RUN_DIR/config.json, and only --episodes/--timesteps, "
        "--no-progress, --quiet, --on-interrupt and --dry-run may be given with it",
    )
    r.add_argument(
        "--on-interrupt",
        default="ask",
        choices=["ask", "report", "stop"],
        help="after Ctrl-C in the search: ask, go on to the report, or stop",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return p
