"""Which proxy ranks the searched policies the way fine-tuning does?

The searches pick the policy the proxy scores highest, so a proxy that favours one kind of policy
more than fine-tuning does (issue 11: under an 8x + 6x MACs budget PPO's policies scored 3-6 points
above the heuristic's on the proxy and fine-tuned 0.6 points below it) sends every search the
wrong way. This rescoring study scores the policies earlier runs found, whose fine-tuned test
accuracy compare.py recorded beside them (``rows.json``), with several proxy variants and prints,
per group of policies at one budget:

- the Spearman rank correlation of each variant's score with the fine-tuned test accuracy,
- pairwise agreement: of the pairs of policies whose fine-tuned accuracies differ by more than
  ``--margin`` points (closer pairs are within fine-tune noise), the share the variant orders
  the same way,
- seconds per evaluation.

A policy found by several runs (the heuristic's, the same in every seed) counts once, with the
mean of its fine-tuned accuracies. A variant is ``name:key=value,...`` with keys ``steps``
(repair SGD steps), ``lr``, ``kd`` (logit distillation weight), ``fkd`` (feature
distillation weight, each decomposed block against the original layer, as ``--feature-kd`` in
the fine-tune) and ``sched`` (the learning-rate schedule, ``rl_mtd.train.SCHEDULES``); unset
keys take the command line's proxy settings.

    python benchmarks/proxy_variants.py --data ../shared/data/cifar10-jpeg.tar.gz \\
      --baseline-epochs 20 --variants base: fkd:fkd=1 long:steps=400 \\
      --group 8x runs/cmp8/*.policy.json --group 16x runs/cmp16/*.policy.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from itertools import combinations
from pathlib import Path

from _common import (
    add_common_args,
    add_proxy_args,
    finetuned_tests,
    machine,
    prefill_factors,
    proxy_config,
    setup,
    spearman,
)

from rl_mtd.errors import exit_on_user_error
from rl_mtd.io import write_json_atomic
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy
from rl_mtd.train import SCHEDULES

NAN = float("nan")
KEYS = {"steps": int, "lr": float, "kd": float, "fkd": float, "sched": str}


def parse_variant(text: str) -> tuple[str, dict[str, float]]:
    name, _, body = text.partition(":")
    values: dict[str, float] = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if key not in KEYS or not eq:
            raise SystemExit(f"bad variant item {item!r} in {text!r}; keys: {', '.join(KEYS)}")
        try:
            values[key] = KEYS[key](value)
        except ValueError:
            raise SystemExit(f"bad value {value!r} for {key} in {text!r}") from None
    if values.get("sched", SCHEDULES[0]) not in SCHEDULES:
        raise SystemExit(f"bad sched in {text!r}; choose one of {', '.join(SCHEDULES)}")
    return name or text, values


def attach_tests(results: list[dict], sweep_rows: list[Path], recipe: str | None) -> None:
    """Set each scored policy's fine-tuned accuracy from finetune_sweep.py's ``rows.json`` files
    (the mean over its files' results; unchanged where none has one)."""
    for r in results:
        for q in r["policies"]:
            tests = finetuned_tests([Path(f) for f in q["files"]], sweep_rows, recipe)
            if tests:
                q["finetuned_test"] = statistics.fmean(tests.values())


def rank_stats(scores: list[float], tests: list[float], margin: float) -> tuple[float, float, int]:
    """Spearman, pairwise agreement and its pair count over the policies with a fine-tuned
    accuracy (NaN marks one scored with ``--untested`` and not fine-tuned yet)."""
    known = [(a, t) for a, t in zip(scores, tests) if not math.isnan(t)]
    if len(known) < 2:
        return NAN, NAN, 0
    a, t = (list(x) for x in zip(*known))
    return (spearman(a, t), *agreement(a, t, margin))


def agreement(scores: list[float], tests: list[float], margin: float) -> tuple[float, int]:
    """Share of the pairs apart by more than ``margin`` in ``tests`` that ``scores`` orders alike."""
    pairs = [(i, j) for i, j in combinations(range(len(tests)), 2)]
    pairs = [(i, j) for i, j in pairs if abs(tests[i] - tests[j]) > margin]
    if not pairs:
        return float("nan"), 0
    same = sum((scores[i] - scores[j]) * (tests[i] - tests[j]) > 0 for i, j in pairs)
    return same / len(pairs), len(pairs)


def strategy_of(file: str) -> str:
    """compare.py names policies ``<strategy>-<target>x-seed<s>.policy.json``."""
    return Path(file).name.split("-")[0]


def _table(results: list[dict], margin: float, near: list[str], machine_text: str) -> list[str]:
    """One row per variant and group: all its policies, then only those ``near`` found."""
    lines = [
        f"pairs apart by more than {margin:g} points after fine-tuning; near: policies found by "
        f"{', '.join(near)}; {machine_text}",
        "",
        "| variant | steps | lr | kd | fkd | schedule | group | policies | Spearman | pairwise agreement "
        "| near: policies | near: Spearman | near: agreement | s per evaluation |",
        "|-|-:|-:|-:|-:|-|-|-:|-:|-:|-:|-:|-:|-:|",
    ]
    for r in results:
        s = r["settings"]
        cells = []
        subsets = (
            r["policies"],
            [q for q in r["policies"] if any(strategy_of(f) in near for f in q["files"])],
        )
        for pols in subsets:
            tests = [q["finetuned_test"] for q in pols]
            rho, agree, pairs = rank_stats([q["score"] for q in pols], tests, margin / 100)
            tested = sum(not math.isnan(t) for t in tests)
            cells += [str(tested), f"{rho:.3f}", f"{agree:.2f} ({pairs} pairs)"]
        lines.append(
            f"| {r['variant']} | {s['steps']} | {s['lr']:g} | {s['kd']:g} | {s['fkd']:g} | "
            f"{s.get('schedule', 'cosine')} | "
            f"{r['group']} | " + " | ".join(cells) + f" | {r['seconds_per_eval']:.1f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    add_proxy_args(p)
    p.add_argument(
        "--group",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME FILE",
        help="a group name, then policy.json files compare.py wrote (repeatable)",
    )
    p.add_argument("--variants", nargs="+", default=["base:"], help="name:key=value,...")
    p.add_argument(
        "--finetuned",
        nargs="+",
        default=[],
        metavar="ROWS",
        help="finetune_sweep.py rows.json files: the fine-tuned test accuracy of policies it ran "
        "(by file stem, mean over its seeds), for policies compare.py did not fine-tune",
    )
    p.add_argument("--recipe", default=None, help="with --finetuned: only this recipe's rows")
    p.add_argument(
        "--untested",
        action="store_true",
        help="also score policies with no fine-tuned accuracy yet (their rows stay empty until "
        "--summarise with --finetuned attaches it), so scoring can run beside the fine-tunes",
    )
    p.add_argument("--margin", type=float, default=0.5, help="points; closer pairs are ties")
    p.add_argument(
        "--near",
        default="ppo,local,sensitivity",
        help="the strategies whose policies (by file name) also get a row of their own: the "
        "close calls the searches that start from the heuristic make",
    )
    p.add_argument(
        "--summarise",
        metavar="JSON",
        help="print the table of an earlier run's --out file (with these --margin and --near) "
        "and stop",
    )
    p.add_argument("--out", default="benchmarks/results/proxy_variants.json")
    args = p.parse_args()
    near = [n.strip() for n in args.near.split(",") if n.strip()]
    if args.recipe and not args.finetuned:
        p.error("--recipe chooses among --finetuned rows; give --finetuned ROWS too")
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        if args.finetuned:
            attach_tests(saved["results"], [Path(r) for r in args.finetuned], args.recipe)
        print("\n".join(_table(saved["results"], args.margin, near, saved.get("machine", "?"))))
        return
    if not args.group:
        p.error("give at least one --group NAME FILE... (or --summarise JSON)")
    variants = [parse_variant(v) for v in args.variants]
    groups: dict[str, list[Path]] = {}
    for name, *files in args.group:
        if not files:
            p.error(f"--group {name}: no policy files")
        groups[name] = [Path(f) for f in files]
        for f in groups[name]:
            if not f.is_file():
                p.error(f"--group {name}: no such file {f}")

    # each group's distinct policies, with the mean fine-tuned test accuracy of their copies
    found: dict[str, list[dict]] = {}
    for name, files in groups.items():
        tests = finetuned_tests(files, [Path(r) for r in args.finetuned], args.recipe)
        by_key: dict[tuple, dict] = {}
        for f in files:
            if f not in tests and not args.untested:
                print(
                    f"skipping {f}: no fine-tuned accuracy in {f.parent / 'rows.json'} or --finetuned"
                )
                continue
            policy = Policy.load(f)
            entry = by_key.setdefault(
                Proxy.policy_key(policy), {"policy": policy, "files": [], "tests": []}
            )
            entry["files"].append(str(f))
            if f in tests:
                entry["tests"].append(tests[f])
        found[name] = list(by_key.values())
        if len(found[name]) < 3:
            p.error(f"--group {name}: {len(found[name])} distinct policies to score; need 3")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cfg, splits, baseline, device = setup(args)
    prefill_factors(baseline)
    base = proxy_config(args)
    results = []
    for vname, values in variants:
        repair = replace(
            base.repair,
            lr=values.get("lr", base.repair.lr),
            kd_alpha=values.get("kd", base.repair.kd_alpha),
            feature_kd=values.get("fkd", base.repair.feature_kd),
            schedule=values.get("sched", base.repair.schedule),
        )
        config = replace(base, repair=repair, repair_steps=values.get("steps", base.repair_steps))
        proxy = Proxy(
            baseline,
            train_split=splits.train,
            proxy_split=splits.proxy,
            device=device,
            config=config,
            net=args.net,
            width=args.width,
        )
        for gname, entries in found.items():
            t0 = time.perf_counter()
            scores = [proxy.evaluate(e["policy"]).accuracy for e in entries]
            seconds = (time.perf_counter() - t0) / len(entries)
            tests = [statistics.fmean(e["tests"]) if e["tests"] else NAN for e in entries]
            rho, agree, pairs = rank_stats(scores, tests, args.margin / 100)  # printed as it goes
            results.append(
                {
                    "variant": vname,
                    "settings": {
                        "steps": config.repair_steps,
                        "lr": repair.lr,
                        "kd": repair.kd_alpha,
                        "fkd": repair.feature_kd,
                        "schedule": repair.schedule,
                    },
                    "group": gname,
                    "policies": [
                        {"files": e["files"], "score": s, "finetuned_test": t}
                        for e, s, t in zip(entries, scores, tests)
                    ],
                    "spearman": rho,
                    "agreement": agree,
                    "pairs": pairs,
                    "seconds_per_eval": seconds,
                }
            )
            r = results[-1]
            print(
                f"{vname} {gname}: Spearman {r['spearman']:.3f}, agreement {agree:.2f} of {pairs}"
                f" pairs, {seconds:.1f} s per evaluation",
                flush=True,
            )
            write_json_atomic(args.out, {"results": results, "args": vars(args)})

    lines = _table(results, args.margin, near, machine())
    print("\n".join(lines))
    write_json_atomic(
        args.out, {"results": results, "args": vars(args), "machine": machine(), "table": lines}
    )


if __name__ == "__main__":
    exit_on_user_error(main)
