"""The one exception type that the command lines turn into a one-line message."""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; the message says what was wrong and what to do.

    The command lines print it as a single line and exit with ``exit_code`` (2, as argparse
    does for bad arguments), never with a traceback.
    """

    exit_code = 2
