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

A search that starts from the sensitivity heuristic's policy (PPO's ``--warm-start
sensitivity``, local search) keeps that policy among the candidates (``with_anchor``): its
proxy score can trail a searched policy's by a fraction of a point that fine-tuning reverses
(BENCHMARKS.md, "PPO and local search warm-started from the 50-step study": 1.89 points below
the heuristic at 16x), so the check decides by the short fine-tune whether the search improved
on its start rather than trusting the proxy.

Near the heuristic that anchor is hard to beat by more than the check can see: 3 annealed
epochs measured on 2,000 held-out images separate policies that end within a point of each
other no better than a coin (BENCHMARKS.md, "The same at 8x parameters": the check left the
heuristic's policy for one 0.35 points better held out and 0.65 worse on test). So the anchor
stays unless the best held-out candidate beats it by more than ``--final-check-margin`` paired
standard errors of the difference of their held-out accuracies, measured image by image on the
same images (``paired_gap``). That error counts only which images were drawn, not how another
seed of the short fine-tune or of the search would have gone, nor that the best of several
challengers is the one compared: a lower bound on the check's noise, so a lead within it
certainly does not move the search off its start.

Each finished candidate is written to ``final_check.json`` at once, so an interrupted check goes
on with ``--resume`` where it stopped.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from rl_mtd.errors import RlMtdError
from rl_mtd.io import write_json_atomic
from rl_mtd.policy import Policy

log = logging.getLogger("rl_mtd")

FINAL_CHECK_FILE = "final_check.json"
BUDGET_KEYS = ("target_ratio", "target_macs", "target_latency", "latency_batch")
"""What an episode's policy metadata keeps from the search's best (the budget it was searched
under)."""


@dataclass
class HeldOut:
    """A candidate's held-out measurement."""

    accuracy: float
    correct: np.ndarray | None = None
    """Image by image, whether the candidate's model was right (bool, the held-out split's
    order): what the paired comparison with the anchor needs; None where not recorded."""


def paired_gap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """How far ``a``'s accuracy leads ``b``'s on the same images (0..1), and the standard error
    of that lead: the spread of the image-by-image differences over the square root of their
    number. Two models right and wrong on the same images differ by less noise than two
    independent samples would: only the images where they disagree count."""
    if a.shape != b.shape or a.ndim != 1:
        raise RlMtdError(
            f"a paired comparison needs the same images for both: got {a.shape} and {b.shape}"
        )
    d = a.astype(np.float64) - b.astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    return float(d.mean()), se


def pack_correct(correct: np.ndarray) -> dict[str, Any]:
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return {"n": int(len(correct)), "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def unpack_correct(saved: dict[str, Any]) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(saved["bits"], validate=True), dtype=np.uint8)
    n = saved["n"]
    if type(n) is not int or not 0 < n <= 8 * len(raw) < n + 8:
        raise ValueError("a candidate's image-by-image record has the wrong length")
    return np.unpackbits(raw)[:n].astype(bool)


@dataclass
class Candidate:
    policy: Policy
    score: float | None
    """What the search ranked it by (reward, or proxy accuracy for random and local search);
    None for a policy the search did not score itself (a warm start's)."""


def policy_key(policy: Policy) -> str:
    """Identity of a policy's choice at every layer (what makes two candidates the same)."""
    return json.dumps([[c.method, c.rank] for c in policy.layers])


def describe(meta: dict[str, Any]) -> str:
    """Where a candidate came from, from its policy's metadata: "the heuristic's policy" for a
    warm start's, "episode 12" for one of PPO's, else its strategy's name."""
    if meta.get("strategy") == "sensitivity":
        return "the heuristic's policy"
    if meta.get("episode") is not None:
        return f"episode {meta['episode']}"
    return str(meta.get("strategy", "the search's best"))


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


def with_anchor(candidates: list[Candidate], anchor: Candidate | None, k: int) -> list[Candidate]:
    """The first ``k`` of ``candidates`` (best first) with ``anchor`` among them for ``k`` >= 2:
    second, after the search's best, unless it is already there (the last of the ``k`` gives
    way). Placed second it wins an exact held-out tie against the candidates after it."""
    if anchor is None:
        return candidates[:k]
    key = policy_key(anchor.policy)
    if any(policy_key(c.policy) == key for c in candidates[:k]):
        return candidates[:k]
    rest = [c for c in candidates[1:] if policy_key(c.policy) != key]
    return [*candidates[:1], anchor, *rest][:k]


def episode_candidates(
    best: Policy,
    episodes: Sequence[dict[str, Any]],
    model: nn.Module,
    k: int,
    *,
    net: str,
    width: float,
    num_classes: int,
    best_score: float | None = None,
    anchor: Candidate | None = None,
) -> list[Candidate]:
    """The search's best policy, then its best-rewarded other episodes: ``k`` distinct in all.

    The best policy comes first whatever its score (``best_score``, else its best episode's
    reward; a warm start's policy may have no episode); ``anchor`` (the warm start's policy)
    is kept among the ``k`` (``with_anchor``).
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
            meta={
                **{k: v for k, v in best.meta.items() if k in BUDGET_KEYS},
                "strategy": "ppo",
                "episode": e.get("episode"),
                "reward": e["reward"],
            },
        )
        scored.append(Candidate(policy, float(e["reward"])))
    key = policy_key(best)
    own = [c.score for c in scored if policy_key(c.policy) == key]
    first = Candidate(best, best_score if best_score is not None else max(own, default=None))
    others = [c for c in scored if policy_key(c.policy) != key]
    return with_anchor([first, *(top_candidates(others, k) if k > 1 and others else [])], anchor, k)


@dataclass
class CheckResult:
    chosen: int
    """Index into ``rows`` of the candidate kept (0: the search's own best)."""
    rows: list[dict[str, Any]]
    seconds: float
    """Fine-tuning seconds of every candidate ever checked for this run, those of an
    interrupted earlier invocation (and of candidates no longer among the best) included."""
    anchor: int | None = None
    """Index into ``rows`` of the policy the search started from, if it was a candidate."""
    margin: float = 0.0
    """Paired standard errors by which the best candidate had to beat the anchor."""
    margin_applied: bool = True
    """False where the margin could not be applied (a candidate without an image-by-image
    record, from an older check file): then the best held-out was kept as it was."""

    @property
    def policy(self) -> Policy:
        return Policy.from_dict(self.rows[self.chosen]["policy"], source=FINAL_CHECK_FILE)

    def to_dict(self) -> dict[str, Any]:
        """What report.json keeps: the choice and each candidate, without its image-by-image
        record (``final_check.json`` has it)."""
        return {
            "chosen": self.chosen,
            "anchor": self.anchor,
            "margin": self.margin,
            "margin_applied": self.margin_applied,
            "seconds": self.seconds,
            "candidates": [{k: v for k, v in r.items() if k != "correct"} for r in self.rows],
        }


def final_check(
    candidates: Sequence[Candidate],
    held_out_accuracy: Callable[[Policy], float | HeldOut],
    *,
    epochs: float,
    path: Path | None = None,
    anchor: Policy | None = None,
    margin: float = 0.0,
) -> CheckResult:
    """Score each candidate by ``held_out_accuracy(policy)`` (a short fine-tune) and keep the best.

    ``anchor``, when it is among the candidates (the policy the search started from), is kept
    unless the best beats it by more than ``margin`` paired standard errors (``paired_gap``;
    it needs both candidates' image-by-image records, else the best is kept as it is).

    With ``path``, each finished candidate is saved there at once, and candidates saved there
    before for the same ``epochs`` are not fine-tuned again (``--resume`` after an interrupt);
    saved candidates that are no longer among ``candidates`` stay in the file (``earlier``) and
    their seconds still count. Ties go to the candidate the search ranked higher.
    """
    if not candidates:
        raise RlMtdError("the final check got no candidates")
    done = _saved_rows(path, epochs)
    keys = [policy_key(c.policy) for c in candidates]
    start = policy_key(anchor) if anchor is not None else None
    earlier = [r for k, r in done.items() if k not in keys]
    rows: list[dict[str, Any]] = []
    for i, (c, key) in enumerate(zip(candidates, keys, strict=True)):
        row = done.get(key)
        if row is None:
            log.info(
                "final check: candidate %d of %d, %s%s (search score %s), %g epochs",
                i + 1,
                len(candidates),
                describe(c.policy.meta),
                ", the search's start" if key == start else "",
                "-" if c.score is None else f"{c.score:.4g}",
                epochs,
            )
            t0 = time.perf_counter()
            measured = held_out_accuracy(c.policy)
            if not isinstance(measured, HeldOut):
                measured = HeldOut(float(measured))
            acc = measured.accuracy
            row = {"key": key, "held_out_acc": acc, "seconds": time.perf_counter() - t0}
            if measured.correct is not None:
                row["correct"] = pack_correct(measured.correct)
            log.info("final check: candidate %d held-out accuracy %.2f%%", i + 1, 100 * acc)
        # This search's view of the policy (its score, its metadata), the saved measurement.
        row = {**row, "policy": c.policy.to_dict(), "search_score": c.score}
        rows.append(row)
        if path is not None:
            pending = [done[k] for k in keys[i + 1 :] if k in done]
            write_json_atomic(
                path, {"epochs": epochs, "candidates": rows, "earlier": earlier + pending}
            )
    best = max(range(len(rows)), key=lambda j: (rows[j]["held_out_acc"], -j))
    anchor_at = keys.index(start) if start in keys else None
    chosen, applied = _against_anchor(rows, best, anchor_at, margin)
    seconds = sum(r["seconds"] for r in rows) + sum(r["seconds"] for r in earlier)
    result = CheckResult(
        chosen, rows, seconds, anchor=anchor_at, margin=margin, margin_applied=applied
    )
    log.info(
        "final check: kept candidate %d of %d, %s (held-out %.2f%%; the search's best %.2f%%)",
        chosen + 1,
        len(rows),
        describe(candidates[chosen].policy.meta),
        100 * rows[chosen]["held_out_acc"],
        100 * rows[0]["held_out_acc"],
    )
    return result


def _against_anchor(
    rows: list[dict[str, Any]], best: int, anchor: int | None, margin: float
) -> tuple[int, bool]:
    """``best``, unless ``anchor`` is a candidate that ``best`` does not beat by more than
    ``margin`` paired standard errors; and whether the margin could be applied. Each other
    candidate's lead over the anchor is recorded in its row (``vs_anchor``, accuracy units)."""
    if anchor is None:
        return best, True
    start = rows[anchor].get("correct")
    try:
        for j, r in enumerate(rows):
            if j != anchor and start is not None and "correct" in r:
                gap, se = paired_gap(unpack_correct(r["correct"]), unpack_correct(start))
                r["vs_anchor"] = {"gap": gap, "se": se}
    except RlMtdError as exc:  # records of other lengths: a hand-edited or foreign file
        log.warning("final check: %s; the best held-out is kept without the margin", exc)
        for r in rows:
            r.pop("vs_anchor", None)
        return best, False
    if best == anchor or margin <= 0:
        return best, True
    lead = rows[best].get("vs_anchor")
    if lead is None:
        log.warning(
            "final check: no image-by-image record of candidate %d or of the search's start (a "
            "check file from an older version); the best held-out is kept without the margin",
            best + 1,
        )
        return best, False
    beyond = lead["gap"] > margin * lead["se"]
    log.info(
        "final check: candidate %d leads the search's start by %.2f points held out, %s %g "
        "paired standard errors (%g x %.2f points): %s",
        best + 1,
        100 * lead["gap"],
        "beyond" if beyond else "within",
        margin,
        margin,
        100 * lead["se"],
        "it replaces the start" if beyond else "the start is kept",
    )
    return (best if beyond else anchor), True


def _saved_rows(path: Path | None, epochs: float) -> dict[str, dict[str, Any]]:
    """The candidates ``path`` holds for ``epochs`` by policy key (current and earlier ones)."""
    if path is None or not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
        if saved.get("epochs") != epochs:
            return {}
        rows = {}
        for r in [*saved["candidates"], *saved.get("earlier", [])]:
            policy = Policy.from_dict(r["policy"], source=str(path))
            if r["key"] != policy_key(policy):
                raise ValueError("a candidate's key does not match its policy")
            if not all(isinstance(r[k], float) for k in ("held_out_acc", "seconds")):
                raise TypeError("a number is not a number")
            if "correct" in r:
                unpack_correct(r["correct"])
            rows[r["key"]] = r
        return rows
    except (ValueError, KeyError, TypeError, AttributeError, RlMtdError):
        log.warning("%s is damaged; the final check starts over", path)
        return {}
