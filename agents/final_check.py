"""The final check: choose among a search's best few candidates by short fine-tunes.

A search scores each policy with the proxy (a BatchNorm re-estimate and a few hundred repair
steps). Far from the original network the proxy stops telling policies apart: at 50x fewer
parameters it ordered six searched policies almost in reverse of where a 20-epoch fine-tune
took them (BENCHMARKS.md, "50x at the default 20-epoch fine-tune"), while a 3-epoch fine-tune
with an annealed learning rate ordered them as the 20-epoch one did ("The final check").

``--final-check K`` therefore takes the ``K`` distinct policies the search scored best, gives each
``--final-check-epochs`` epochs of the run's own fine-tune (schedule annealed to zero over those
epochs, same seed for every candidate), and keeps the one with the best held-out accuracy (the
proxy split: the test split stays unseen). The full fine-tune then starts again from that policy's
freshly compressed model. Its seconds are part of the search's.

Each finished candidate is written to ``final_check.json`` at once, so an interrupted check goes
on with ``--resume`` where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rl_mtd.errors import RlMtdError
from rl_mtd.io import write_json_atomic
from rl_mtd.policy import Policy

log = logging.getLogger("rl_mtd")

FINAL_CHECK_FILE = "final_check.json"


@dataclass
class Candidate:
    policy: Policy
    score: float | None
    """What the search ranked it by (reward, or proxy accuracy for random and local search);
    None for a policy the search did not score itself (a warm start's)."""


def policy_key(policy: Policy) -> str:
    """Identity of a policy's choice at every layer (what makes two candidates the same)."""
    return json.dumps([[c.method, c.rank] for c in policy.layers])


def top_candidates(scored: Iterable[Candidate], k: int) -> list[Candidate]:
    """The ``k`` best-scored distinct policies, best first (unscored ones last); of equal
    policies the best-scored counts, and ties keep the order they came in."""
    if k < 1:
        raise RlMtdError(f"the final check needs at least 1 candidate, got {k}")

    def order(c: Candidate) -> float:
        return -c.score if c.score is not None else float("inf")

    best: dict[str, Candidate] = {}
    for c in sorted(scored, key=order):
        best.setdefault(policy_key(c.policy), c)
    return list(best.values())[:k]


def episode_candidates(
    best: Policy,
    episodes: Sequence[dict[str, Any]],
    model: nn.Module,
    k: int,
    *,
    net: str,
    width: float,
    num_classes: int,
) -> list[Candidate]:
    """The search's best policy, then its best-rewarded other episodes: ``k`` distinct in all.

    The best policy comes first whatever its episode's reward (a warm start's has none).
    """
    scored = []
    for e in episodes:
        choices = [
            (m, tuple(r) if isinstance(r, list) else r)
            for m, r in zip(e["methods"], e["ranks"], strict=True)
        ]
        policy = Policy.from_choices(
            model,
            choices,
            net=net,
            width=width,
            num_classes=num_classes,
            meta={**best.meta, "episode": e.get("episode"), "reward": e["reward"]},
        )
        scored.append(Candidate(policy, float(e["reward"])))
    key = policy_key(best)
    own = [c.score for c in scored if policy_key(c.policy) == key]
    first = Candidate(best, max(own) if own else None)
    others = [c for c in scored if policy_key(c.policy) != key]
    return [first, *(top_candidates(others, k - 1) if k > 1 and others else [])]


@dataclass
class CheckResult:
    chosen: int
    """Index into ``rows`` of the candidate kept."""
    rows: list[dict[str, Any]]
    seconds: float
    """Fine-tuning seconds of every candidate, those of an interrupted earlier run included."""

    @property
    def policy(self) -> Policy:
        return Policy.from_dict(self.rows[self.chosen]["policy"], source=FINAL_CHECK_FILE)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "seconds": self.seconds, "candidates": self.rows}


def final_check(
    candidates: Sequence[Candidate],
    held_out_accuracy: Callable[[Policy], float],
    *,
    epochs: float,
    path: Path | None = None,
) -> CheckResult:
    """Score each candidate by ``held_out_accuracy(policy)`` (a short fine-tune) and keep the best.

    With ``path``, each finished candidate is saved there at once and candidates already saved
    there for the same ``epochs`` are not fine-tuned again (``--resume`` after an interrupt).
    Ties go to the candidate the search ranked higher.
    """
    if not candidates:
        raise RlMtdError("the final check got no candidates")
    done = _saved_rows(path, epochs)
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(candidates):
        key = policy_key(c.policy)
        row = done.get(key)
        if row is None:
            log.info(
                "final check: candidate %d of %d (search score %s), %g epochs",
                i + 1,
                len(candidates),
                "-" if c.score is None else f"{c.score:.4g}",
                epochs,
            )
            t0 = time.perf_counter()
            acc = held_out_accuracy(c.policy)
            row = {
                "key": key,
                "policy": c.policy.to_dict(),
                "search_score": c.score,
                "held_out_acc": acc,
                "seconds": time.perf_counter() - t0,
            }
            log.info("final check: candidate %d held-out accuracy %.2f%%", i + 1, 100 * acc)
        rows.append(row)
        if path is not None:
            write_json_atomic(path, {"epochs": epochs, "candidates": rows})
    chosen = max(range(len(rows)), key=lambda j: (rows[j]["held_out_acc"], -j))
    result = CheckResult(chosen, rows, sum(r["seconds"] for r in rows))
    log.info(
        "final check: kept candidate %d of %d (held-out %.2f%%; the search's best %.2f%%)",
        chosen + 1,
        len(rows),
        100 * rows[chosen]["held_out_acc"],
        100 * rows[0]["held_out_acc"],
    )
    return result


def _saved_rows(path: Path | None, epochs: float) -> dict[str, dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        if saved.get("epochs") != epochs:
            return {}
        rows = {}
        for r in saved["candidates"]:
            Policy.from_dict(r["policy"], source=str(path))
            if not all(isinstance(r[k], float) for k in ("held_out_acc", "seconds")):
                raise TypeError("a number is not a number")
            rows[r["key"]] = r
        return rows
    except (ValueError, KeyError, TypeError, AttributeError, RlMtdError):
        log.warning("%s is damaged; the final check starts over", path)
        return {}
