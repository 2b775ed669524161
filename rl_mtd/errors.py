"""The one exception type that user-facing code turns into a clear message without a traceback."""

import sys
from collections.abc import Callable


class RlMtdError(ValueError):
    """Bad input from a user: a wrong name, a file that does not fit, a missing dataset.

    Subclasses ``ValueError`` so callers that validate input can catch either. The message
    names the problem and, where there is one, the fix.
    """


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run a script's ``main``: a user's mistake (``RlMtdError``) ends it with one line,
    ``error: ...``, and exit status 2 instead of a traceback; its return value is the status."""
    try:
        status = main()
    except RlMtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)
