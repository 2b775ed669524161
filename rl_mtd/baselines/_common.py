"""What the baseline strategies share: the (method, rank) pair and the unreachable-target error."""

from __future__ import annotations

from collections.abc import Iterable

from rl_mtd.budget import Budget, BudgetMeter
from rl_mtd.decompose import Rank, next_rank
from rl_mtd.errors import RlMtdError

MethodRank = tuple[str, Rank]
"""One conv layer's ``(method, rank)``, as ``Policy.from_choices`` and ``params_after`` take it.

Not ``rl_mtd.budget.OptionIndex``, which is a (method index, level index) into a ``BudgetTable``.
"""


def unreachable(budget: Budget, reached: str, what: str) -> RlMtdError:
    """The error for a budget that even ``what`` (which ``reached`` that much) cannot meet."""
    wanted = " and ".join(
        f"{v:g}x {name}"
        for v, name in ((budget.params, "parameters"), (budget.macs, "MACs"))
        if v is not None
    )
    return RlMtdError(
        f"a reduction of {wanted} cannot be reached by {what}: at most {reached} on this model; "
        "lower the target"
    )


def settle(meter: BudgetMeter, choices: list[MethodRank], order: Iterable[int]) -> list[MethodRank]:
    """Give back what ``choices`` compress beyond ``meter``'s budget: in ``order``, raise each
    decomposed layer's rank (same method) as far as the budget still allows.

    A greedy over coarse levels overshoots (the MTD heuristic reached 17.6x for a 16x target);
    this lands within one rank step of the limit, so strategies are compared at the target.
    ``choices`` must meet the budget; the result does too.
    """
    out = list(choices)
    for i in order:
        method, rank = out[i]
        conv = meter.convs[i][1]
        while method != "keep":
            bigger = next_rank(conv, method, rank)
            if bigger is None:
                break
            trial = [*out[:i], (method, bigger), *out[i + 1 :]]
            if not meter.meets(trial):
                break
            out, rank = trial, bigger
    return out
