"""The one error the commands raise for bad input."""


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit status 2, nothing written."""
