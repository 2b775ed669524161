"""What the baseline strategies share: the (method, rank) pair and the unreachable-target error."""

from __future__ import annotations

from rl_mtd.decompose import Rank
from rl_mtd.errors import RlMtdError

MethodRank = tuple[str, Rank]
"""One conv layer's ``(method, rank)``, as ``Policy.from_choices`` and ``params_after`` take it.

Not ``rl_mtd.budget.OptionIndex``, which is a (method index, level index) into a ``BudgetTable``.
"""


def unreachable(target: float, best: int, params_original: int, what: str) -> RlMtdError:
    """The error for a target that even ``what`` (leaving ``best`` parameters) cannot reach."""
    return RlMtdError(
        f"target ratio {target:g} cannot be reached by {what}: at most "
        f"{params_original / best:.2f}x on this model; lower the target"
    )
