"""The one exception type that user-facing code turns into a clear message without a traceback."""


class RlMtdError(ValueError):
    """Bad input from a user: a wrong name, a file that does not fit, a missing dataset.

    Subclasses ``ValueError`` so callers that validate input can catch either. The message
    names the problem and, where there is one, the fix.
    """
