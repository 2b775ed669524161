"""How far into a fine-tune does the held-out accuracy rank policies as the finished fine-tune does?

A proxy that ranks far-apart policies the way fine-tuning does is what the searches lack at high
budgets (BENCHMARKS.md, 50x). finetune_sweep.py records, for every fine-tune, the held-out
accuracy at each evaluation (``history`` in its ``rows.json``): what a shorter run with the same
recipe would have seen so far (not exactly what a shorter run would reach: its learning rate
would have decayed sooner). This script reads those files and prints, for each evaluation point,
the Spearman rank correlation of the held-out accuracy there with the final test accuracy, and the
share of the pairs more than ``--margin`` points apart at the end that it already orders alike.
One row per fine-tune (policy and seed); rows of one recipe only (``--recipe``).

    python benchmarks/history_rank.py runs/ft/*/rows.json --recipe fkd20lr2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import spearman
from proxy_variants import agreement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", type=Path, help="finetune_sweep.py rows.json files")
    p.add_argument("--recipe", default=None, help="only this recipe's rows")
    p.add_argument("--margin", type=float, default=0.5, help="points; closer pairs are ties")
    args = p.parse_args()
    runs = []
    for f in args.rows:
        for r in json.loads(f.read_text()):
            if args.recipe is None or r["recipe"] == args.recipe:
                runs.append(r)
    if len(runs) < 3:
        p.error(f"{len(runs)} fine-tunes in these files; need 3 to rank")
    if any(not r.get("history") for r in runs):
        p.error("some rows have no history (finetune_sweep.py records it since commit 7cff34e)")
    recipes = {r["recipe"] for r in runs}
    if len(recipes) > 1:
        p.error(f"rows of several recipes ({', '.join(sorted(recipes))}); choose one with --recipe")
    if len({len(r["history"]) for r in runs}) > 1 or any(
        r.get("settings", {}).get("stages", 1) != 1 for r in runs
    ):
        p.error("the fine-tunes' evaluations do not line up (other lengths or staged runs)")
    points = len(runs[0]["history"])
    final = [r["test_acc"] for r in runs]
    print(
        f"{len(runs)} fine-tunes: "
        + ", ".join(f"{r['policy']} seed {r['seed']} {100 * r['test_acc']:.2f}%" for r in runs)
    )
    print()
    print(
        "| epoch | Spearman with the final test accuracy | pairwise agreement | best at this point |"
    )
    print("|-:|-:|-:|-|")
    for i in range(points):
        now = [r["history"][i]["val_acc"] for r in runs]
        agree, pairs = agreement(now, final, args.margin / 100)
        best = max(range(len(runs)), key=lambda k: now[k])
        print(
            f"| {runs[0]['history'][i]['epoch']:.1f} | {spearman(now, final):.3f} | "
            f"{agree:.2f} ({pairs} pairs) | {runs[best]['policy']} seed {runs[best]['seed']} |"
        )


if __name__ == "__main__":
    main()
