"""The one exception type that user-facing code turns into a clear message without a traceback,
and the one message for a failed write."""

import errno
import sys
from collections.abc import Callable


class RlMtdError(ValueError):
    """Bad input from a user: a wrong name, a file that does not fit, a missing dataset.

    Subclasses ``ValueError`` so callers that validate input can catch either. The message
    names the problem and, where there is one, the fix.
    """


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def os_error_message(exc: OSError, outputs: str = "--out / RL_MTD_CACHE") -> str:
    """What failed, where, and what to do: free space for a full disk, else another place."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in FULL_DISK:
        fix = f"free some space there, or point {outputs} at a disk with room"
    else:
        fix = f"check that the place is a writable directory, or pick another {outputs}"
    return f"{exc.strerror or exc}{where}; {fix}"


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run a script's ``main``: a user's mistake (``RlMtdError``) ends it with one line,
    ``error: ...``, and exit status 2 instead of a traceback; a full disk with one line and
    status 1 (other OS errors keep their traceback: they may be reads, or bugs); its return
    value is the status."""
    try:
        status = main()
    except RlMtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in FULL_DISK:
            raise
        where = "the script's output option or RL_MTD_CACHE"
        print(f"error: {os_error_message(exc, where)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
