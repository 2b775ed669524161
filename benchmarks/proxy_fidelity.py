"""Does the proxy rank policies the way fine-tuning does?

For N random policies at one target ratio (each through the budget wall), measure:
- proxy accuracy with the BatchNorm re-estimate (what the search uses),
- proxy accuracy without it (the decomposed net with the baseline's BN statistics),
- test accuracy after a short fine-tune, equal for every policy,
and print the Spearman rank correlation of each proxy with the fine-tuned accuracy.

    python benchmarks/proxy_fidelity.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import add_common_args, machine, setup, spearman

from rl_mtd.baselines import random_policies
from rl_mtd.io import write_json_atomic
from rl_mtd.proxy import Proxy, ProxyConfig
from rl_mtd.train import TrainConfig, evaluate, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--target", type=float, default=8.0)
    p.add_argument("--policies", type=int, default=8)
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--bn-batches", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/proxy_fidelity.json")
    args = p.parse_args()
    cfg, splits, baseline, device = setup(args)

    with_bn = Proxy(baseline, train=splits.train, proxy=splits.proxy, device=device,
                    config=ProxyConfig(bn_batches=args.bn_batches, seed=args.seed))  # fmt: skip
    without_bn = Proxy(baseline, train=splits.train, proxy=splits.proxy, device=device,
                       config=ProxyConfig(bn_batches=0))  # fmt: skip
    policies = random_policies(with_bn, args.target, args.policies, seed=args.seed)
    base_test = evaluate(baseline, splits.test)
    rows = []
    for i, policy in enumerate(policies):
        t0 = time.perf_counter()
        r_bn = with_bn.evaluate(policy)
        r_raw = without_bn.evaluate(policy)
        model = with_bn.compress(policy)
        train(model, splits.train, progress=not args.no_progress, desc=f"fine-tune {i + 1}",
              config=TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr,
                                 schedule="cosine", seed=args.seed))  # fmt: skip
        test = evaluate(model, splits.test)
        rows.append({"policy": i + 1, "ratio": r_bn.compression_ratio, "proxy_bn": r_bn.accuracy,
                     "proxy_raw": r_raw.accuracy, "finetuned_test": test,
                     "methods": "".join(m[0] for m in policy.methods()),
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"policy {i + 1}: ratio {r_bn.compression_ratio:.1f}x proxy(BN) {r_bn.accuracy:.4f} "
              f"proxy(raw) {r_raw.accuracy:.4f} fine-tuned test {test:.4f}", flush=True)  # fmt: skip

    ft = [r["finetuned_test"] for r in rows]
    rho_bn = spearman([r["proxy_bn"] for r in rows], ft)
    rho_raw = spearman([r["proxy_raw"] for r in rows], ft)
    lines = [
        f"{cfg.net} width {cfg.width:g}, baseline test accuracy {base_test:.4f}, target "
        f"{args.target:g}x, {len(rows)} random policies, fine-tune {args.finetune_epochs:g} "
        f"epoch(s) at lr {args.finetune_lr:g}, proxy split {len(splits.proxy)} images, "
        f"BN re-estimate {args.bn_batches} batches; {machine()}",
        "",
        "| policy | methods (k/t/c per layer) | ratio | proxy, BN re-estimated | proxy, raw BN | "
        "fine-tuned test |",
        "|-:|-|-:|-:|-:|-:|",
        *[f"| {r['policy']} | {r['methods']} | {r['ratio']:.1f}x | {100 * r['proxy_bn']:.2f}% | "
          f"{100 * r['proxy_raw']:.2f}% | {100 * r['finetuned_test']:.2f}% |" for r in rows],
        "",
        f"Spearman(proxy with BN re-estimate, fine-tuned test) = {rho_bn:.3f}",
        f"Spearman(proxy without it, fine-tuned test) = {rho_raw:.3f}",
    ]  # fmt: skip
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"rows": rows, "spearman_bn": rho_bn, "spearman_raw": rho_raw,
                                 "baseline_test": base_test, "args": vars(args),
                                 "machine": machine()})  # fmt: skip


if __name__ == "__main__":
    main()
