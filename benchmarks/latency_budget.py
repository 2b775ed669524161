"""The MTD heuristic under a MACs budget against the same heuristic under a latency budget.

For each ``--macs M``: the sensitivity heuristic's policy at ``--target`` parameters and M x
fewer MACs; the speed-up the per-layer latency model (``rl_mtd.latency``, timed here at
``--batch`` with ``--threads`` threads) predicts for it; then the heuristic's policy at the same
parameter target and that predicted speed-up instead of the MACs limit. Prints, per pair,
parameters, MACs, the predicted speed-up and the speed-up measured on the whole inference forms,
and saves both policies in ``--out-dir`` (fine-tune them with ``finetune_sweep.py --policy``):
at one speed, which budget keeps the more accurate network?

    python benchmarks/latency_budget.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        --baseline-epochs 20 --target 8 --macs 6,12 --batch 64 --out-dir runs/latency-budget

The sensitivity study comes from the cache (or is measured, as for ``compare.py``). Run it on
an idle machine: the latency model warns when other processes used the CPUs while it timed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _common import add_common_args, add_proxy_args, make_proxy, setup

from agents.config import RunConfig
from agents.inputs import latency_model
from agents.studies import cached_study
from rl_mtd.baselines import strategy_policy
from rl_mtd.budget import Budget
from rl_mtd.errors import RlMtdError, exit_on_user_error
from rl_mtd.latency import measured_timer
from rl_mtd.metrics import count_macs, count_params
from rl_mtd.policy import apply_policy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    add_proxy_args(p)
    p.add_argument("--target", type=float, default=8.0, help="parameter reduction of every policy")
    p.add_argument("--macs", default="6,12", help="comma-separated MACs reductions")
    p.add_argument("--batch", type=int, default=64, help="batch size the latency is for")
    p.add_argument("--threads", type=int, default=2, help="torch threads while timing")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    cfg, splits, baseline, device = setup(args)
    proxy = make_proxy(args, baseline, splits, device)
    study = cached_study(proxy)  # the proxy's own repair steps, as when it was recorded
    torch.set_num_threads(args.threads)
    latency = latency_model(  # the run's own model: timed here, cached per machine context
        RunConfig(net=args.net, width=args.width, target_latency=2.0, latency_batch=args.batch),
        device,
    )
    print(latency.describe(), flush=True)
    timer = measured_timer(device, repeats=20, rounds=3)
    original_ms = timer(baseline, (args.batch, 3, 32, 32))
    params0, macs0 = count_params(baseline), count_macs(baseline)
    print(
        f"\n| budget | params x | MACs x | predicted speed-up b{args.batch} | measured b{args.batch}"
        " | methods |\n|-|-:|-:|-:|-:|-|"
    )
    for m in (float(v) for v in args.macs.split(",") if v.strip()):
        by_macs = strategy_policy("sensitivity", proxy, Budget(args.target, m), study=study)
        speedup = latency.speedup(by_macs.choices())
        rows = [("macs", f"{args.target:g}x params, {m:g}x MACs", by_macs)]
        try:
            by_time = strategy_policy(
                "sensitivity",
                proxy,
                Budget(args.target, latency=speedup, latency_model=latency),
                study=study,
            )
            rows.append(("latency", f"{args.target:g}x params, {speedup:.2f}x faster", by_time))
        except RlMtdError as exc:  # e.g. a net so small that decomposing never saves time
            print(f"| {args.target:g}x params, {speedup:.2f}x faster | unreachable: {exc} |")
        for name, label, policy in rows:
            model = apply_policy(baseline, policy, factorize=False)
            measured = original_ms / timer(model, (args.batch, 3, 32, 32))
            print(
                f"| {label} | {params0 / count_params(model):.2f} | {macs0 / count_macs(model):.2f}"
                f" | {latency.speedup(policy.choices()):.2f}x | {measured:.2f}x | "
                f"{' '.join(policy.methods())} |",
                flush=True,
            )
            policy.save(out / f"sensitivity-{args.target:g}x-{name}-for-macs{m:g}.policy.json")
    latency.save()


if __name__ == "__main__":
    exit_on_user_error(main)
