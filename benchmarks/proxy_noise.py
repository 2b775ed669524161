"""How much of a proxy score is the repair's seed, for the policies the searches actually pick?

`proxy_fidelity.py` ranks random policies, which differ by tens of points. The searches that
start from the sensitivity heuristic (PPO with a warm start, local) compare policies a point or
two apart, so what matters there is the proxy's own noise: score each given policy with the
repaired proxy under several repair seeds (the seed picks the repair's batches), and print each
policy's mean and spread, the pooled within-policy standard deviation, and - where a compare.py
``rows.json`` recorded the policy's fine-tuned test accuracy - the Spearman correlation of the
seed-0 score and of the mean score with it.

    python benchmarks/proxy_noise.py --data ../shared/data/cifar10-jpeg.tar.gz \
      --baseline-epochs 20 --policies runs/cmp/*.policy.json --proxy-seeds 0,1,2
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    add_proxy_args(p)
    p.add_argument("--policies", nargs="+", required=True, help="policy.json files")
    p.add_argument("--proxy-seeds", default="0,1,2", help="comma-separated repair seeds")
    p.add_argument("--out", default="benchmarks/results/proxy_noise.json")
    args = p.parse_args()
    seeds = [int(s) for s in args.proxy_seeds.split(",")]
    if len(seeds) < 2:
        p.error("--proxy-seeds needs at least two seeds to measure a spread")
    files = [Path(f) for f in args.policies]
    for f in files:
        if not f.is_file():
            p.error(f"--policies: no such file {f}")
    cfg, splits, baseline, device = setup(args)
    prefill_factors(baseline)
    proxies = {
        s: Proxy(
            baseline,
            train_split=splits.train,
            proxy_split=splits.proxy,
            device=device,
            config=replace(proxy_config(args), seed=s),
            net=args.net,
            width=args.width,
        )
        for s in seeds
    }
    tests = finetuned_tests(files)
    rows = []
    for f in files:
        policy = Policy.load(f)
        scores = [proxies[s].evaluate(policy).accuracy for s in seeds]
        rows.append(
            {
                "policy": str(f),
                "methods": "".join(m[0] for m in policy.methods()),
                "scores": scores,
                "mean": statistics.fmean(scores),
                "sd": statistics.stdev(scores),
                "finetuned_test": tests.get(f),
            }
        )
        r = rows[-1]
        print(
            f"{f}: " + " ".join(f"{100 * s:.2f}" for s in scores) + f" -> {100 * r['mean']:.2f}"
            f" +- {100 * r['sd']:.2f}",
            flush=True,
        )
    pooled = statistics.fmean(r["sd"] ** 2 for r in rows) ** 0.5
    means = [r["mean"] for r in rows]
    with_test = [r for r in rows if r["finetuned_test"] is not None]
    rho = {}
    if len(with_test) >= 3:
        ft = [r["finetuned_test"] for r in with_test]
        rho = {
            f"seed {seeds[0]}": spearman([r["scores"][0] for r in with_test], ft),
            f"mean of {len(seeds)}": spearman([r["mean"] for r in with_test], ft),
        }
    lines = [
        f"{cfg.net} width {cfg.width:g}, {len(rows)} policies, repair {args.repair_steps} steps "
        f"at lr {args.repair_lr:g}, repair seeds {args.proxy_seeds}; {machine()}",
        "",
        "| policy | methods | "
        + " | ".join(f"proxy seed {s}" for s in seeds)
        + " | mean | sd | fine-tuned test |",
        "|-|-|" + "-:|" * (len(seeds) + 3),
        *[
            f"| {r['policy']} | {r['methods']} | "
            + " | ".join(f"{100 * s:.2f}%" for s in r["scores"])
            + f" | {100 * r['mean']:.2f}% | {100 * r['sd']:.2f} | "
            + ("" if r["finetuned_test"] is None else f"{100 * r['finetuned_test']:.2f}%")
            + " |"
            for r in rows
        ],
        "",
        f"pooled within-policy sd {100 * pooled:.2f} points; spread of the policies' means "
        f"{100 * (max(means) - min(means)):.2f} points",
        *[
            f"Spearman with the fine-tuned test, {k}: {v:.3f} ({len(with_test)} policies)"
            for k, v in rho.items()
        ],
    ]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out,
        {
            "rows": rows,
            "pooled_sd": pooled,
            "spearman": rho,
            "args": vars(args),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    exit_on_user_error(main)
