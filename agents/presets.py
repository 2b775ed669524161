"""The presets of a run (smoke, cpu, paper) and the proxy's repair defaults they share: the
values each was chosen with, and why. ``agents.config.RunConfig.with_preset`` applies them."""

from __future__ import annotations

from typing import Any

# Proxy repair (SGD steps before scoring; rl_mtd.proxy): enough to rank policies as fine-tuning
# does (BENCHMARKS.md, proxy fidelity), at about 8 s per episode for VGG11 w0.25 on 2 CPU cores.
REPAIR_STEPS = 200
STUDY_REPAIR_STEPS = 50
"""Repair steps of each sensitivity-study entry unless ``--study-repair-steps`` says otherwise
(never more than the search's ``--repair-steps``). BENCHMARKS.md, "A cheaper sensitivity study":
VGG11 width 0.25, a 50-step study costs 3.7x less than a 200-step one (445 s against 1628 s),
ranks the entries alike (Spearman 0.97), and the heuristic's policies from it fine-tune as well
(3 seeds: within a quarter point at 8x, 32x and 8x + 6x MACs, 1.4 points better at 16x)."""


def study_steps(repair_steps: int, study_repair_steps: int | None) -> int:
    """Repair steps of each sensitivity-study entry: ``--study-repair-steps`` where given, else
    ``STUDY_REPAIR_STEPS`` or the search's ``--repair-steps``, whichever is fewer."""
    if study_repair_steps is None:
        return min(repair_steps, STUDY_REPAIR_STEPS)
    return study_repair_steps


SEARCH_FROM_HEURISTIC: dict[str, Any] = dict(
    warm_start="sensitivity", observe="study", imitate_best=True, final_check=3
)
"""How the cpu and paper presets search: from the MTD sensitivity heuristic, seeing its study,
re-centring on the best policy found (BENCHMARKS.md, 16x, 3 seeds: 74.07% against 72.85% for
local search and 72.30% for the heuristic alone), then choosing among the 3 best candidates by
3-epoch fine-tunes, the heuristic's policy always one of them and left only for a lead beyond
2 paired standard errors (``final_check_margin``). BENCHMARKS.md, "The anchored check at 32x":
at 32x (3 seeds) and, replayed with the margin, at 8x, 16x and 8x + 6x MACs the check ends at
the heuristic's policy, which fine-tuned as well as or better than the searches' favourites;
at 50x it gained 2.3 points on average. The preset's check yields where it cannot apply (a
replay, no budget, fewer episodes). The smoke preset keeps the plain agent."""

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: a pipeline check, not a result.
    "smoke": dict(
        baseline_epochs=4,
        train_size=2000,
        proxy_size=500,
        test_size=1000,
        episodes=16,
        bn_batches=4,
        repair_steps=2,
        finetune_epochs=0.5,
        latency_repeats=3,
    ),
    # A real but small search that fits a 2-core CPU in an hour or two at width 0.25.
    # The fine-tune is most of what the accuracy depends on: with the heuristic's 8x policy
    # (VGG11 width 0.25, BENCHMARKS.md, feature distillation) 3 and 8 epochs at lr 0.01 gave
    # 79.25% and 80.25%, 20 epochs 81.48% at lr 0.01 and 81.72% at lr 0.02 (3 seeds).
    "cpu": dict(
        baseline_epochs=15,
        train_size=None,
        proxy_size=2000,
        test_size=None,
        episodes=120,
        bn_batches=8,
        repair_steps=REPAIR_STEPS,
        finetune_epochs=20,
        latency_repeats=10,
        **SEARCH_FROM_HEURISTIC,
    ),
    # Paper scale; meant for a GPU. 60 fine-tune epochs: on the CPU (VGG11 width 0.25, the
    # heuristic's 16x policy, BENCHMARKS.md) 20, 40 and 60 epochs gave 78.77%, 79.72% and 80.01%
    # (3, 2 and 3 seeds); on an H200 a distilled VGG16 epoch takes about 3.5-5 s.
    "paper": dict(
        baseline_epochs=60,
        train_size=None,
        proxy_size=5000,
        test_size=None,
        episodes=600,
        bn_batches=20,
        repair_steps=REPAIR_STEPS,
        finetune_epochs=60,
        latency_repeats=20,
        **SEARCH_FROM_HEURISTIC,
    ),
}
