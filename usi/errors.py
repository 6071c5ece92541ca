"""The one exception type a user is meant to see: a one-line message, exit code 2."""


class UsageError(Exception):
    """Bad recipe, data, model name or file: the user can fix it from the message alone."""
