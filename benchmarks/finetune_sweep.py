"""Which fine-tune recipe recovers most accuracy at one budget? (issue 10, levers 2 and 3)

Compresses the baseline with one fixed policy per budget (a ``policy.json``, or the sensitivity
heuristic's at ``--targets``, from the cached study) and fine-tunes copies of it with each recipe
and seed, then prints test accuracy per recipe: mean and spread over seeds, collapse recoveries
and seconds. A recipe is ``name:key=value,...`` with keys

    ep      fine-tune epochs in all (default --epochs)
    lr      peak learning rate (default 0.01)
    kd      logit distillation weight from the baseline, 0..1 (default 0)
    fkd     feature distillation weight (each decomposed block against the original layer)
    stages  compress in this many stages, the epochs split evenly between them (default 1)
    wd      weight decay (default 5e-4)
    ls      label smoothing (default 0)

Each row keeps, image by image, whether its fine-tuned model was right on the held-out split
(``heldout_correct``), and with two or more policies a second table gives each policy's held-out
lead over the first one's, same recipe and seed, with its paired standard error: how the final
check (``--final-check``, same recipe as ``ft3:fkd=1,ep=3,lr=0.02``) sees two policies, and whether
``--final-check-margin`` would let it leave the first (the search's start).

    python benchmarks/finetune_sweep.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --baseline-epochs 20 --targets 16 --seeds 0,1 \\
        --recipes "base:lr=0.01" "kd:kd=0.5" "feat:fkd=1" "staged:stages=3"
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from _common import add_common_args, add_proxy_args, machine, make_proxy, setup

from agents.config import RunConfig
from agents.final_check import pack_correct, paired_gap, unpack_correct
from agents.finetune import compress_and_finetune
from agents.studies import cached_study
from rl_mtd.baselines import strategy_policy
from rl_mtd.budget import Budget
from rl_mtd.errors import exit_on_user_error
from rl_mtd.evaluation import correct_per_image, evaluate, fresh_bn_accuracy
from rl_mtd.io import write_json_atomic, write_text_atomic
from rl_mtd.metrics import count_macs, count_params
from rl_mtd.policy import Policy


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: float
    lr: float = 0.01
    kd: float = 0.0
    fkd: float = 0.0
    stages: int = 1
    wd: float = 5e-4
    ls: float = 0.0


KEYS = {
    "ep": "epochs",
    "lr": "lr",
    "kd": "kd",
    "fkd": "fkd",
    "stages": "stages",
    "wd": "wd",
    "ls": "ls",
}


def parse_recipe(text: str, epochs: float) -> Recipe:
    name, _, body = text.partition(":")
    values: dict[str, float | int] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if key not in KEYS or not eq:
            raise SystemExit(f"bad recipe item {item!r} in {text!r}; keys: {', '.join(KEYS)}")
        values[KEYS[key]] = int(value) if key == "stages" else float(value)
    return Recipe(name=name or text, **{"epochs": epochs, **values})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    add_proxy_args(p)
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        help="policy.json (repeatable; the first is the one the paired table compares with, "
        "before any --targets heuristic's)",
    )
    p.add_argument("--targets", default="", help="also the sensitivity policy at these targets")
    p.add_argument("--recipes", nargs="+", required=True, help="name:key=value,... (see above)")
    p.add_argument("--epochs", type=float, default=3.0, help="default fine-tune epochs")
    p.add_argument("--seeds", default="0", help="comma-separated fine-tune seeds")
    p.add_argument("--out-dir", default="benchmarks/results/finetune_sweep")
    args = p.parse_args()
    if args.fit != "weights":
        p.error("--stages factorises fine-tuned kernels by the kernels alone; use --fit weights")
    recipes = [parse_recipe(r, args.epochs) for r in args.recipes]
    seeds = [int(s) for s in args.seeds.split(",")]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg, splits, baseline, device = setup(args)
    base_test = evaluate(baseline, splits.test, full_precision=True)
    proxy = make_proxy(args, baseline, splits, device)
    policies = [(Path(f).stem, Policy.load(f)) for f in args.policy]
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    if targets:
        # the study with the proxy's own repair steps (200), as in the BENCHMARKS.md sections
        # that used --targets; run_agent.py's default study has STUDY_REPAIR_STEPS (50)
        study = cached_study(proxy)
        for t in targets:
            pol = strategy_policy("sensitivity", study.proxy, Budget(t), study=study, seed=0)
            pol.save(out_dir / f"sensitivity-{t:g}x.policy.json")
            policies.append((f"sensitivity-{t:g}x", pol))
    params0, macs0 = count_params(baseline), count_macs(baseline)
    print(f"baseline test accuracy {100 * base_test:.2f}%; {machine()}", flush=True)

    rows = []
    for pname, policy in policies:
        for recipe in recipes:
            for seed in seeds:
                t0 = time.perf_counter()
                run_cfg = RunConfig(  # run_agent.py's own compress-and-fine-tune, this recipe
                    net=args.net,
                    width=args.width,
                    seed=seed,
                    batch_size=args.batch_size,
                    bn_batches=args.bn_batches,
                    finetune_epochs=recipe.epochs,
                    finetune_lr=recipe.lr,
                    finetune_weight_decay=recipe.wd,
                    finetune_label_smoothing=recipe.ls,
                    kd=recipe.kd,
                    feature_kd=recipe.fkd,
                    stages=recipe.stages,
                    progress=False,
                )
                model, ft = compress_and_finetune(run_cfg, proxy, policy, baseline, splits)
                recoveries = ft.recoveries
                model.eval()
                row = {
                    "policy": pname,
                    "recipe": recipe.name,
                    "settings": recipe.__dict__,
                    "seed": seed,
                    "ratio": params0 / count_params(model),
                    "macs_reduction": macs0 / count_macs(model),
                    "test_acc": evaluate(model, splits.test, full_precision=True),
                    # on the proxy split, which chose the checkpoint: compare recipes on this
                    "heldout_acc": ft.best_acc,
                    "heldout_correct": pack_correct(correct_per_image(model, splits.proxy).numpy()),
                    # the same weights with BatchNorm statistics re-estimated: what stale running
                    # statistics cost at the end of the fine-tune
                    "test_acc_bn": fresh_bn_accuracy(
                        model, splits.train, splits.test, batches=50, seed=seed, full_precision=True
                    ),
                    "recoveries": recoveries,
                    "seconds": time.perf_counter() - t0,
                    # held-out accuracy at each evaluation: what a shorter run would have seen
                    "history": ft.history,
                }
                rows.append(row)
                print(
                    f"| {pname} | {recipe.name} | {seed} | {row['ratio']:.1f}x | "
                    f"{100 * row['test_acc']:.2f}% (BN re-estimated {100 * row['test_acc_bn']:.2f}%) | "
                    f"{recoveries} | {row['seconds']:.0f} |",
                    flush=True,
                )
                write_json_atomic(out_dir / "rows.json", rows)

    table = _summary(rows, base_test, args) + _paired(rows)
    print(table)
    write_text_atomic(out_dir / "table.md", table + "\n")


def _summary(rows: list[dict], base_test: float, args) -> str:
    lines = [
        f"{args.net} width {args.width:g}, baseline test accuracy {100 * base_test:.2f}%; "
        f"{machine()}",
        "",
        "| policy | recipe | settings | seeds | held-out acc: mean (the best evaluation, "
        "which also chose the checkpoint) | test acc: mean (min-max) "
        "| drop | recoveries | s |",
        "|-|-|-|-:|-:|-:|-:|-:|-:|",
    ]
    for key in dict.fromkeys((r["policy"], r["recipe"]) for r in rows):
        g = [r for r in rows if (r["policy"], r["recipe"]) == key]
        acc = [100 * r["test_acc"] for r in g]
        s = g[0]["settings"]
        settings = ", ".join(f"{k} {v:g}" for k, v in s.items() if k != "name")
        mean = statistics.mean(acc)
        held = [100 * r["heldout_acc"] for r in g if r.get("heldout_acc") is not None]
        shown = f"{statistics.mean(held):.2f}%" if held else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {settings} | {len(g)} | {shown} | {mean:.2f}% "
            f"({min(acc):.2f}-{max(acc):.2f}) | {100 * base_test - mean:.2f} | "
            f"{sum(r['recoveries'] for r in g)} | {statistics.mean(r['seconds'] for r in g):.0f} |"
        )
    return "\n".join(lines)


def _paired(rows: list[dict]) -> str:
    """Each policy's held-out lead over the first policy's, recipe by recipe and seed by seed,
    with its paired standard error (empty with one policy)."""
    first = rows[0]["policy"] if rows else None
    pairs = []
    for r in rows:
        if r["policy"] == first:
            continue
        ref = next(
            (
                q
                for q in rows
                if q["policy"] == first and (q["recipe"], q["seed"]) == (r["recipe"], r["seed"])
            ),
            None,
        )
        if ref is None or "heldout_correct" not in ref or "heldout_correct" not in r:
            continue
        gap, se = paired_gap(
            unpack_correct(r["heldout_correct"]), unpack_correct(ref["heldout_correct"])
        )
        test = 100 * (r["test_acc"] - ref["test_acc"])
        pairs.append(
            f"| {r['policy']} | {r['recipe']} | {r['seed']} | {100 * gap:+.2f} | "
            f"{100 * se:.2f} | {f'{gap / se:+.2f}' if se > 0 else '-'} | {test:+.2f} |"
        )
    if not pairs:
        return ""
    head = [
        "",
        "",
        f"Against {first}, same recipe and seed, on the same held-out images:",
        "",
        "| policy | recipe | seed | held-out lead (points) | paired s.e. (points) | "
        "lead / s.e. | test lead (points) |",
        "|-|-|-:|-:|-:|-:|-:|",
    ]
    return "\n".join(head + pairs)


if __name__ == "__main__":
    exit_on_user_error(main)
