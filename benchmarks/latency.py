"""Inference latency of compressed VGGs: eager, ``rl_mtd.export.inference_model``, ONNX Runtime.

For the original net and each policy (``--policy FILE``, repeatable; by default uniform Tucker-2
and uniform CP at ``--target`` and one random mixed policy at the same target) it prints, per
batch size, a markdown table: whole-model parameter ratio and MAC reduction against the original,
then for each way of running the model the median forward time with its 10th-90th percentiles
and the speed-up against the original run the same way:

- ``eager``: the ``apply_policy`` model in eval mode (BatchNorm, factor chains as built);
- ``inference``: ``rl_mtd.export.inference_model`` of it (BatchNorm folded, chains merged where
  cheaper, channels_last);
- ``onnxruntime``: ``rl_mtd.export.to_onnx`` of it run by ONNX Runtime with ``--threads``
  intra-op threads (skipped with a note when onnx/onnxruntime are not installed); the file's
  factor chains are padded to this CPU's channel block (``rl_mtd.conv_pad``), as a
  ``--export onnx`` run writes them.

Weights are random (latency does not depend on their values): the decomposed blocks are built
with ``apply_policy(..., factorize=False)`` (no CP-ALS time) and every conv is re-initialised
variance-preserving, so activations stay at the original net's scale (no denormal slow paths).
Timing: ``rl_mtd.metrics.measure_latency`` with ``--threads`` torch threads (and as many ONNX
Runtime intra-op threads) under ``torch.inference_mode``: ``--warmup`` untimed passes, then the
median and 10th-90th percentiles of ``--repeats`` passes; ``--rounds`` sweeps over all models
and ways, keeping each one's round with the lowest median. Speed-ups compare medians.

On ``--device cuda``, ``--bf16`` adds the inference form in bfloat16 (inputs cast inside; also
with the channels inside factor chains padded to multiples of 8, which tensor cores want) and
``--graphs`` every form replayed from a CUDA graph (``rl_mtd.export.CudaGraphed``), and the GPU
goals (no slower than the original at batch 1, 2x faster at the largest batch) are checked per
form.

``--ablate`` adds columns for the inference form without merging and/or without channels_last
(``inference_model(merge=False)``, ``channels_last=False``), for it with its factor chains
padded as the ONNX file's are (``pad_channels``), and for the ONNX file without the padding
(``to_onnx(pad_channels=1)``): what each part of it is worth.
``--profile`` also prints, per model and batch size, where the time of a pass goes in the eager
and the inference form: milliseconds in 1x1 convs, other dense convs, depthwise convs,
BatchNorm, ReLU, max-pooling and the head (forward hooks on the leaf modules).

Run: ``python benchmarks/latency.py`` (VGG16 width 1, batches 1 and 64, about 2 minutes on a
2-core CPU). Run it on an idle machine: the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Run from a checkout without installing: make ``rl_mtd`` importable.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rl_mtd.baselines import random_policies, uniform_policy  # noqa: E402
from rl_mtd.conv_pad import nchwc_block  # noqa: E402
from rl_mtd.decompose import DecomposedConv  # noqa: E402
from rl_mtd.errors import exit_on_user_error  # noqa: E402
from rl_mtd.export import CudaGraphed, inference_model, to_onnx  # noqa: E402
from rl_mtd.metrics import (  # noqa: E402
    count_macs,
    count_params,
    cpu_name,  # noqa: E402
    measure_latency,
)
from rl_mtd.metrics import cpu_seconds as _cpu_seconds  # noqa: E402
from rl_mtd.metrics import others_cpu_share as others_share  # noqa: E402
from rl_mtd.models import build_vgg  # noqa: E402
from rl_mtd.policy import Policy, apply_policy  # noqa: E402

WAYS = ("eager", "inference", "onnxruntime")
# --ablate: the inference form with parts of it switched off (inference_model's options).
ABLATIONS = {
    "fold, NCHW": {"merge": False, "channels_last": False},
    "fold+merge, NCHW": {"channels_last": False},
    "fold, channels_last": {"merge": False},
}
# Goals from the issue (2 threads on the CPU).
T2_MIN_SPEEDUP_B1 = 10.0
MIN_SPEEDUP_PER_MAC_REDUCTION = 0.5


@dataclass
class Entry:
    """One model: its counts and its runnable forms."""

    name: str
    params: int
    macs: int
    forms: dict[str, nn.Module]
    results: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)


class Cast(nn.Module):
    """``module`` fed its inputs cast to ``dtype`` (a bf16 inference form takes float32 inputs)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype))


class OrtModule(nn.Module):
    """An ONNX Runtime session behind ``forward``, so ``measure_latency`` can time it."""

    def __init__(self, path: Path, threads: int):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {"input": x.numpy()})
        return torch.from_numpy(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--net", default=None, help="default: the first --policy's, else vgg16")
    p.add_argument("--width", type=float, default=None, help="default: the policy's, else 1")
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="FILE",
        help="policy.json to time (repeatable; default: uniform tucker2, uniform cp "
        "and one random mixed policy at --target)",
    )
    p.add_argument("--target", type=float, default=37.0, help="ratio of the default policies")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=20, help="timed passes per block")
    p.add_argument("--warmup", type=int, default=5, help="untimed passes before each block")
    p.add_argument("--rounds", type=int, default=2, help="sweeps; each entry keeps its best")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: time with CUDA events on the GPU (no ONNX Runtime column there)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime column")
    p.add_argument("--profile", action="store_true", help="also print where the time goes")
    p.add_argument(
        "--ablate",
        action="store_true",
        help="also time the inference form without merging and/or without channels_last",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="cuda: also time the inference form in bfloat16 (inputs cast from float32 inside)",
    )
    p.add_argument(
        "--graphs",
        action="store_true",
        help="cuda: also time every form replayed from a CUDA graph (rl_mtd.export.CudaGraphed)",
    )
    args = p.parse_args(argv)
    if (args.bf16 or args.graphs) and args.device != "cuda":
        p.error("--bf16 and --graphs are for --device cuda")
    if args.profile and args.device != "cpu":
        p.error("--profile times each module with the CPU's clock; use it with --device cpu")
    return args


def machine(threads: int) -> str:
    return (
        f"{cpu_name()}, {os.cpu_count()} CPUs, {threads} threads, torch {torch.__version__}, "
        f"{_ort_version()}"
    )


def _ort_version() -> str:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return "onnxruntime not installed"
    return f"onnxruntime {onnxruntime.__version__}"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def default_policies(model: nn.Module, net: str, width: float, target: float) -> list[Policy]:
    mixed = random_policies(model, target, 1, seed=0, net=net, width=width, settled=False)[0]
    return [
        uniform_policy(model, "tucker2", target, net=net, width=width),
        uniform_policy(model, "cp", target, net=net, width=width),
        mixed,
    ]


def policy_label(policy: Policy, source: str | None = None) -> str:
    strategy = policy.meta.get("strategy", "policy")
    methods = sorted(set(policy.methods()) - {"keep"})
    what = "uniform " + methods[0] if strategy in ("tucker2", "cp") else f"{strategy} mixed"
    return f"{source} ({what})" if source else what


@torch.no_grad()
def variance_preserving(model: nn.Module) -> nn.Module:
    """Re-initialise every conv so activations keep their scale through the net (in place).

    Inside a decomposed block (no nonlinearity between its convs) gain 1; the conv that feeds a
    ReLU gets gain sqrt(2), as for the original net's convs.
    """
    inner = set()
    for block in model.modules():
        if isinstance(block, DecomposedConv):
            convs = [m for m in block if isinstance(m, nn.Conv2d)]
            inner.update(id(c) for c in convs[:-1])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            std = (1.0 if id(m) in inner else 2.0) ** 0.5 / fan_in**0.5
            m.weight.normal_(0, std)
    return model


def build_entries(args: argparse.Namespace, onnx_dir: Path | None) -> list[Entry]:
    loaded = [(Policy.load(p), Path(p).name) for p in args.policy]
    net = args.net or (loaded[0][0].net if loaded else "vgg16")
    width = args.width or (loaded[0][0].width if loaded else 1.0)
    args.net, args.width = net, width  # for the header
    torch.manual_seed(args.seed)
    original = variance_preserving(build_vgg(net, width=width)).eval()
    policies = loaded or [(p, None) for p in default_policies(original, net, width, args.target)]
    models = [("original", original)]
    for policy, source in policies:
        compressed = apply_policy(original, policy, factorize=False)
        models.append((policy_label(policy, source), variance_preserving(compressed).eval()))
    entries = []
    for i, (name, model) in enumerate(models):
        model = model.to(args.device)
        forms: dict[str, nn.Module] = {"eager": model, "inference": inference_model(model)}
        if args.ablate:  # and padded as the ONNX file is (for tensor cores: multiples of 8)
            forms.update((k, inference_model(model, **kw)) for k, kw in ABLATIONS.items())
            pad = nchwc_block() if args.device == "cpu" else 8
            forms[f"inference, padded to {pad}"] = inference_model(model, pad_channels=pad)
        if args.bf16:
            bf16 = inference_model(model, dtype=torch.bfloat16)
            forms["inference, bf16"] = Cast(bf16, torch.bfloat16)
            bf16 = inference_model(model, dtype=torch.bfloat16, pad_channels=8)
            forms["inference, bf16, padded to 8"] = Cast(bf16, torch.bfloat16)
        if args.graphs:
            forms.update({f"{k}, graph": CudaGraphed(m) for k, m in list(forms.items())})
        if onnx_dir is not None:
            forms["onnxruntime"] = OrtModule(to_onnx(model, onnx_dir / f"{i}.onnx"), args.threads)
            if args.ablate:
                unpadded = to_onnx(model, onnx_dir / f"{i}.unpadded.onnx", pad_channels=1)
                forms["onnxruntime, unpadded"] = OrtModule(unpadded, args.threads)
        entries.append(Entry(name, count_params(model), count_macs(model), forms))
    return entries


def time_batch(entries: list[Entry], bs: int, args: argparse.Namespace) -> float | None:
    """Fill every entry's ``results`` at batch ``bs``: ``--rounds`` sweeps over all models and
    forms. Returns the share of the CPUs that other processes used meanwhile.

    Each sweep times every (model, form) in one block of ``--repeats`` passes after ``--warmup``
    (one pass per call, interleaved, would make every pass wake a sleeping thread pool, torch's
    or ONNX Runtime's); the round with the lowest median is kept, so a background job that runs
    for a while spoils one round, not the table.
    """
    torch.set_num_threads(args.threads)
    before, t0 = _cpu_seconds(), time.perf_counter()
    kw = {
        "batch_size": bs,
        "device": args.device,
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    for _ in range(args.rounds):
        for e in entries:
            for way, net in e.forms.items():
                with torch.inference_mode():
                    r = measure_latency(net, **kw)
                best = e.results.get((way, bs))
                if best is None or r["median_ms"] < best["median_ms"]:
                    e.results[(way, bs)] = r
    busy = others_share(before, time.perf_counter() - t0)
    print(f"  timed batch {bs} (load {_load()})", file=sys.stderr, flush=True)
    return busy


def _median(e: Entry, way: str, bs: int) -> float:
    return e.results[(way, bs)]["median_ms"]


def table(entries: list[Entry], bs: int, ways: list[str]) -> str:
    base = entries[0]
    head = ["model", "params x", "MACs x"]
    for way in ways:
        head += [f"{way} ms (p10-p90)", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "-|" * len(head)]
    for e in entries:
        row = [e.name, f"{base.params / e.params:.1f}", f"{base.macs / e.macs:.1f}"]
        for way in ways:
            r = e.results[(way, bs)]
            speedup = _median(base, way, bs) / r["median_ms"]
            row += [
                f"{r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f})",
                f"{speedup:.1f}x",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def goals(entries: list[Entry], batches: list[int], ways: list[str]) -> list[str]:
    """The issue's goals, checked in every column (speed-up against the original run alike)."""
    base = entries[0]
    out = []

    def speedup(e: Entry, way: str, bs: int) -> float:
        return _median(base, way, bs) / _median(e, way, bs)

    t2 = [e for e in entries if e.name.endswith("uniform tucker2")]
    if 1 in batches and t2:
        for way in ways:
            s = speedup(t2[0], way, 1)
            ok = "met" if s >= T2_MIN_SPEEDUP_B1 else "NOT met"
            out.append(
                f"- uniform Tucker-2 >= {T2_MIN_SPEEDUP_B1:g}x at batch 1, {way}: {s:.1f}x, {ok}"
            )
    big = max(batches)
    for e in entries[1:]:
        need = MIN_SPEEDUP_PER_MAC_REDUCTION * base.macs / e.macs
        for way in ways:
            s = speedup(e, way, big)
            ok = "met" if s >= need else "NOT met"
            out.append(
                f"- {e.name} at batch {big}, {way}: speed-up {s:.1f}x vs "
                f">= {need:.1f}x (half its MAC reduction), {ok}"
            )
    return out


def gpu_goals(entries: list[Entry], batches: list[int], ways: list[str]) -> list[str]:
    """Issue 12 on the GPU: each compressed model no slower than the original at batch 1 and at
    least 2x faster at the largest batch, each form against the original in the same form."""
    base, out = entries[0], []
    for e in entries[1:]:
        for way in ways:
            for bs, need in ((1, 1.0), (max(batches), 2.0)):
                if bs not in batches or (need == 2.0 and bs == 1):
                    continue
                s = _median(base, way, bs) / _median(e, way, bs)
                ok = "met" if s >= need else "NOT met"
                out.append(f"- GPU, {e.name}, batch {bs}, {way}: {s:.2f}x vs >= {need:g}x, {ok}")
    return out


KINDS = ("conv 1x1", "conv kxk", "depthwise", "batchnorm", "relu", "maxpool", "linear")


def module_kind(m: nn.Module) -> str | None:
    """The profile's category of a leaf module (None: not timed on its own)."""
    if isinstance(m, nn.Conv2d):
        if m.groups > 1:
            return "depthwise"
        return "conv 1x1" if m.kernel_size == (1, 1) else "conv kxk"
    kinds = {nn.BatchNorm2d: "batchnorm", nn.ReLU: "relu", nn.MaxPool2d: "maxpool"}
    return kinds.get(type(m), "linear" if isinstance(m, nn.Linear) else None)


def profile_kinds(net: nn.Module, x: torch.Tensor, passes: int = 5) -> dict[str, float]:
    """Milliseconds per pass spent in each kind of module (forward hooks), and ``total``."""
    spent = dict.fromkeys(KINDS, 0.0)
    started: dict[int, float] = {}
    hooks = []

    def pre(m: nn.Module, _inp) -> None:
        started[id(m)] = time.perf_counter()

    def post(m: nn.Module, _inp, _out) -> None:
        spent[module_kind(m)] += time.perf_counter() - started[id(m)]

    for m in net.modules():
        if module_kind(m) is not None:
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.inference_mode():
            for _ in range(3):
                net(x)
            spent = dict.fromkeys(KINDS, 0.0)
            t0 = time.perf_counter()
            for _ in range(passes):
                net(x)
            total = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    out = {k: v * 1e3 / passes for k, v in spent.items()}
    out["total"] = total * 1e3 / passes
    return out


def profile(entries: list[Entry], bs: int, threads: int) -> str:
    """Where one pass's time goes, per kind of module, in the eager and the inference form."""
    torch.set_num_threads(threads)
    x = torch.randn(bs, 3, 32, 32)
    head = ["model", "form", "total ms", *KINDS, "rest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "-|" * len(head)]
    for e in entries:
        for way in ("eager", "inference"):
            ms = profile_kinds(e.forms[way], x)
            rest = ms["total"] - sum(ms[k] for k in KINDS)
            cells = [f"{ms[k]:.2f}" for k in ("total", *KINDS)] + [f"{rest:.2f}"]
            lines.append("| " + " | ".join([e.name, way, *cells]) + " |")
    return "\n".join(lines)


BUSY_WARNING = 0.05
"""Share of the CPUs other processes may use while timing before the table is flagged."""


def _busy_note(share: float | None) -> str:
    if share is None:
        return ""
    note = f"; other processes used {share:.0%} of the CPUs meanwhile"
    if share > BUSY_WARNING:
        note += " - NOT TRUSTWORTHY, rerun on an idle machine"
    return note


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    print(f"    {command}\n")
    print(f"machine: {machine(args.threads)}; load average at start {_load()}\n")
    if args.device == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32
        print(
            f"GPU: {torch.cuda.get_device_name()}; the float32 forms' convolutions "
            f"{'use TF32, as by default' if tf32 else 'run in full float32'} "
            f"(torch.backends.cudnn.allow_tf32 = {tf32})\n"
        )
    use_onnx = (
        args.device == "cpu" and not args.no_onnx and not _ort_version().endswith("not installed")
    )
    with tempfile.TemporaryDirectory() as tmp:
        entries = build_entries(args, Path(tmp) if use_onnx else None)
        ways = list(entries[0].forms)
        print(f"{args.net} width {args.width:g}, random weights (see the docstring)\n")
        for bs in batches:  # each table as soon as it is timed: a stopped run keeps it
            busy = time_batch(entries, bs, args)
            print(
                f"batch {bs}, {args.threads} threads, median of {args.repeats} passes "
                f"(best of {args.rounds} rounds){_busy_note(busy)}:\n",
                flush=True,
            )
            print(table(entries, bs, ways) + "\n", flush=True)
        if not use_onnx:
            print(
                "onnxruntime column skipped: pip install onnx onnxruntime "
                '(or pip install "rl-mtd[export]")\n'
            )
        print("Goals (speed-up against the original run the same way):\n")
        if args.device == "cuda":
            print("\n".join(gpu_goals(entries, batches, ways)))
            print("\nThe CPU's goals, checked on this GPU for reference only:\n")
        print("\n".join(goals(entries, batches, [w for w in ways if w in WAYS])))
        print(f"\nload average at the end {_load()}")
        if args.profile:
            for bs in batches:
                print(
                    f"\nWhere the time goes at batch {bs} (ms per pass, forward hooks; rest: "
                    "Python, flatten, hooks):\n"
                )
                print(profile(entries, bs, args.threads))


if __name__ == "__main__":
    exit_on_user_error(main)
