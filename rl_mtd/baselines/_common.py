"""What the baseline strategies share: the (method, rank) pair and the unreachable-target error."""

from __future__ import annotations

from rl_mtd.budget import Budget
from rl_mtd.budget import settle as settle  # re-exported
from rl_mtd.decompose import Rank
from rl_mtd.errors import RlMtdError

MethodRank = tuple[str, Rank]
"""One conv layer's ``(method, rank)``, as ``Policy.from_choices`` and ``params_after`` take it.

Not ``rl_mtd.budget_table.OptionIndex``, which is a (method index, level index) into a
``BudgetTable``.
"""


def unreachable(budget: Budget, reached: str, what: str) -> RlMtdError:
    """The error for a budget that even ``what`` (which ``reached`` that much) cannot meet."""
    wanted = " and ".join(
        f"{v:g}x {name}"
        for v, name in (
            (budget.params, "parameters"),
            (budget.macs, "MACs"),
            (budget.latency, "predicted latency"),
        )
        if v is not None
    )
    return RlMtdError(
        f"a reduction of {wanted} cannot be reached by {what}: at most {reached} on this model; "
        "lower the target"
    )
