"""Does a cheaper sensitivity study choose the same policies? (issue 11: the study's cost)

The sensitivity study scores every layer alone at every option with the repaired proxy (200
SGD steps per entry by default), and costs about half of each searched row of the comparison
on a CPU. This script measures the same study with fewer repair steps per entry (each variant
cached like the full one) and compares it with the full study: seconds, Spearman rank
correlation over the entries, the heuristic's policy at each budget (how many layers differ),
and each variant's policy scored by the full proxy (one evaluation each):

    python benchmarks/study_probe.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --baseline-epochs 20 --probe-steps 0,25,50 --budgets 8,16,50,8m6

A budget is a parameter ratio, optionally with ``mM`` for a MACs reduction it also needs.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import add_common_args, add_proxy_args, machine, proxy_config, setup, spearman

from agents.studies import cached_study
from rl_mtd.baselines import strategy_policy
from rl_mtd.baselines.sensitivity import SensitivityStudy
from rl_mtd.budget import Budget
from rl_mtd.errors import RlMtdError, exit_on_user_error
from rl_mtd.io import write_json_atomic
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy


def parse_budget(text: str) -> Budget:
    params, _, macs = text.strip().partition("m")
    try:
        return Budget(float(params), float(macs) if macs else None)
    except ValueError:
        raise RlMtdError(
            f"bad budget {text!r}; write a ratio such as 16, or 8m6 (8x, 6x MACs)"
        ) from None


def short(policy: Policy) -> str:
    """Layers as ``k`` (kept), ``cN`` (CP rank N) or ``tA,B`` (Tucker-2 ranks)."""
    out = []
    for method, rank in policy.choices():
        if method == "keep":
            out.append("k")
        elif method == "cp":
            out.append(f"c{rank}")
        else:
            out.append("t" + ",".join(str(r) for r in rank))
    return " ".join(out)


def study_vector(study: SensitivityStudy) -> tuple[list, list[float]]:
    keys = sorted(study.results)
    return keys, [study.results[k] for k in keys]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    add_proxy_args(p)
    p.add_argument(
        "--probe-steps", default="0,25,50", help="repair steps per entry of each cheaper study"
    )
    p.add_argument("--budgets", default="8,16,50,8m6", help="comma-separated, e.g. 16 or 8m6")
    p.add_argument("--out", default="benchmarks/results/study_probe.json")
    p.add_argument(
        "--policy-dir",
        default=None,
        help="also save each policy as DIR/s<steps>-<budget>.policy.json (to fine-tune them "
        "with benchmarks/finetune_sweep.py --policy)",
    )
    args = p.parse_args()
    probe_steps = [int(s) for s in args.probe_steps.split(",") if s.strip()]
    budgets = [(b.strip(), parse_budget(b)) for b in args.budgets.split(",") if b.strip()]

    _, splits, baseline, device = setup(args)

    def proxy_with(steps: int) -> Proxy:
        return Proxy(
            baseline,
            train_split=splits.train,
            proxy_split=splits.proxy,
            device=device,
            config=proxy_config(args, repair_steps=steps),
            net=args.net,
            width=args.width,
        )

    full_proxy = proxy_with(args.repair_steps)
    studies, run_seconds = {}, {}
    for steps in [args.repair_steps, *probe_steps]:
        proxy = full_proxy if steps == args.repair_steps else proxy_with(steps)
        t0 = time.perf_counter()
        studies[steps] = cached_study(proxy)
        run_seconds[steps] = time.perf_counter() - t0
        print(
            f"study with {steps} repair steps: {studies[steps].seconds:.0f} s when measured "
            f"({run_seconds[steps]:.0f} s in this run; a cached one costs nothing now)",
            flush=True,
        )
    full = studies[args.repair_steps]
    keys, full_values = study_vector(full)

    rows = []
    for steps, study in studies.items():
        k2, values = study_vector(study)
        if k2 != keys:
            raise RlMtdError("the studies measured different entries; rerun with the same levels")
        row = {
            "repair_steps": steps,
            "seconds": study.seconds,
            "seconds_this_run": run_seconds[steps],
            "spearman": spearman(full_values, values),
            "policies": {},
        }
        for name, budget in budgets:
            try:
                pol = strategy_policy("sensitivity", full_proxy, budget, study=study, seed=0)
                ref = strategy_policy("sensitivity", full_proxy, budget, study=full, seed=0)
            except RlMtdError as exc:  # an unreachable budget: the others still run
                print(f"budget {name}: skipped ({exc})", flush=True)
                continue
            differ = sum(a != b for a, b in zip(pol.choices(), ref.choices()))
            if args.policy_dir:
                os.makedirs(args.policy_dir, exist_ok=True)
                pol.save(os.path.join(args.policy_dir, f"s{steps}-{name}.policy.json"))
            row["policies"][name] = {
                "policy": short(pol),
                "layers_differing": differ,
                "full_proxy_acc": float(full_proxy.evaluate(pol).accuracy),
            }
        rows.append(row)
        write_json_atomic(args.out, rows)

    print(f"\n{args.net} width {args.width:g}, {len(keys)} study entries; {machine()}\n")
    names = [n for n, _ in budgets if n in rows[0]["policies"]]
    head = " | ".join(f"{n}: layers differing, full-proxy acc" for n in names)
    print(f"| repair steps | study s | Spearman with the full study | {head} |")
    print("|-:|-:|-:|" + "-|" * len(names))
    for r in rows:
        cells = " | ".join(
            f"{r['policies'][n]['layers_differing']}, {100 * r['policies'][n]['full_proxy_acc']:.2f}%"
            for n in names
        )
        print(f"| {r['repair_steps']} | {r['seconds']:.0f} | {r['spearman']:.3f} | {cells} |")
    print("\nPolicies (layers in order; k kept, cN CP rank N, tA,B Tucker-2 ranks):\n")
    for r in rows:
        for name, v in r["policies"].items():
            print(f"- {r['repair_steps']} steps, {name}: {v['policy']}")


if __name__ == "__main__":
    exit_on_user_error(main)
