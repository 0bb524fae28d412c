"""The one error class for bad input from a user: the command line prints it as one line."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a config value, a path, a data record, base models that do not fit): the message
    says what is wrong and how to fix it, in one sentence. A `ValueError`, so code that catches
    those keeps working; every other exception is a bug and the command line shows its traceback.
    """
