"""Does the proxy rank policies the way fine-tuning does?

For N random policies at one target ratio (each through the budget wall), measure three proxies:
- raw: the decomposed net with the baseline's BatchNorm statistics,
- BN: with the BatchNorm re-estimate (no gradients),
- repair: the BN re-estimate plus a short seeded repair (``--repair-steps`` SGD steps) - what
  run_agent.py's cpu and paper presets use,
and the test accuracy after a short fine-tune, equal for every policy, and print the Spearman
rank correlation of each proxy with the fine-tuned accuracy. The fine-tune uses another seed
than the proxy (``--finetune-seed``), so the repair's batches are not the fine-tune's first ones.

    python benchmarks/proxy_fidelity.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import (
    add_common_args,
    add_proxy_args,
    machine,
    prefill_factors,
    proxy_config,
    setup,
    spearman,
)

from rl_mtd.baselines import random_policies
from rl_mtd.errors import exit_on_user_error
from rl_mtd.evaluation import evaluate
from rl_mtd.io import write_json_atomic
from rl_mtd.proxy import Proxy
from rl_mtd.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    add_proxy_args(p)
    p.add_argument("--target", type=float, default=8.0)
    p.add_argument("--policies", type=int, default=12)
    p.add_argument("--finetune-epochs", type=float, default=3.0)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--finetune-seed", type=int, default=None, help="default: --seed + 1")
    p.add_argument("--out", default="benchmarks/results/proxy_fidelity.json")
    args = p.parse_args()
    if args.repair_steps < 1:
        p.error("--repair-steps must be >= 1 here: the repaired proxy is one of the three measured")
    ft_seed = args.seed + 1 if args.finetune_seed is None else args.finetune_seed
    cfg, splits, baseline, device = setup(args)
    prefill_factors(baseline)  # factorising is not a proxy's cost: time the proxies warm

    def make(config):
        return Proxy(
            baseline,
            train_split=splits.train,
            proxy_split=splits.proxy,
            device=device,
            config=config,
            net=args.net,
            width=args.width,
        )

    proxies = {
        "raw": make(proxy_config(args, bn_batches=0, repair_steps=0)),
        "bn": make(proxy_config(args, repair_steps=0)),
        "repair": make(proxy_config(args)),
    }
    policies = random_policies(
        baseline,
        args.target,
        args.policies,
        seed=args.seed,
        net=args.net,
        width=args.width,
        settled=False,
    )
    base_test = evaluate(baseline, splits.test, full_precision=True)
    rows = []
    for i, policy in enumerate(policies):
        t0 = time.perf_counter()
        scored = {name: px.evaluate(policy) for name, px in proxies.items()}
        model = proxies["bn"].compress(policy)  # fine-tuning starts from the unrepaired net
        train(
            model,
            splits.train,
            desc=f"fine-tune {i + 1}",
            config=TrainConfig(
                epochs=args.finetune_epochs, lr=args.finetune_lr, schedule="cosine", seed=ft_seed
            ),
        )
        test = evaluate(model, splits.test, full_precision=True)
        rows.append(
            {
                "policy": i + 1,
                "ratio": scored["bn"].compression_ratio,
                **{f"proxy_{k}": r.accuracy for k, r in scored.items()},
                **{f"seconds_{k}": r.seconds for k, r in scored.items()},
                "finetuned_test": test,
                "methods": "".join(m[0] for m in policy.methods()),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"policy {i + 1}: ratio {rows[-1]['ratio']:.1f}x "
            + " ".join(f"proxy({k}) {r.accuracy:.4f}" for k, r in scored.items())
            + f" fine-tuned test {test:.4f}",
            flush=True,
        )

    ft = [r["finetuned_test"] for r in rows]
    rho = {k: spearman([r[f"proxy_{k}"] for r in rows], ft) for k in proxies}
    secs = {k: statistics.median(r[f"seconds_{k}"] for r in rows) for k in proxies}
    lines = [
        f"{cfg.net} width {cfg.width:g}, baseline test accuracy {base_test:.4f}, target "
        f"{args.target:g}x, {len(rows)} random policies, fine-tune {args.finetune_epochs:g} "
        f"epoch(s) at lr {args.finetune_lr:g} (cosine, seed {ft_seed}), proxy split {len(splits.proxy)} images, "
        f"BN re-estimate {args.bn_batches} batches, repair {args.repair_steps} steps at lr "
        f"{args.repair_lr:g}, kd {args.repair_kd:g}; {machine()}",
        "",
        "| policy | methods (k/t/c per layer) | ratio | proxy raw BN | proxy BN re-estimated | "
        "proxy BN + repair | fine-tuned test |",
        "|-:|-|-:|-:|-:|-:|-:|",
        *[
            f"| {r['policy']} | {r['methods']} | {r['ratio']:.1f}x | {100 * r['proxy_raw']:.2f}% | "
            f"{100 * r['proxy_bn']:.2f}% | {100 * r['proxy_repair']:.2f}% | "
            f"{100 * r['finetuned_test']:.2f}% |"
            for r in rows
        ],
        "",
        "| proxy | Spearman with fine-tuned test | median seconds per policy |",
        "|-|-:|-:|",
        *[f"| {k} | {rho[k]:.3f} | {secs[k]:.2f} |" for k in proxies],
    ]
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out,
        {
            "rows": rows,
            "spearman": rho,
            "seconds": secs,
            "baseline_test": base_test,
            "args": vars(args),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    exit_on_user_error(main)
