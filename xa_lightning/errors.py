"""Errors the user can fix, reported as one line by the command-line tools."""


class UserError(Exception):
    """A problem the user can fix: one line naming the config key or file and how to fix it.

    The CLI prints ``error: <message>`` and exits with status 2, without a traceback.
    """
