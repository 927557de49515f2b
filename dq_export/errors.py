"""The one exception type that the command lines turn into a one-line message, and how
another error is quoted inside it."""

from __future__ import annotations

import re


class UserError(Exception):
    """Bad input the user can fix; the message says what was wrong and what to do.

    The command lines print it as a single line and exit with ``exit_code`` (2, as argparse
    does for bad arguments), never with a traceback.
    """

    exit_code = 2


SOURCE_LOCATION = re.compile(r"\.(cpp|hpp|h):\d+:?$")  # OpenVINO's "Exception from x.cpp:84:"


def first_line(error: BaseException, limit: int = 160) -> str:
    """An exception's message cut to one short line, to quote inside a UserError: the first
    line that says what went wrong, not where in C++ it was noticed."""
    lines = [line.strip() for line in str(error).splitlines()]
    said = [line for line in lines if line and not SOURCE_LOCATION.search(line)]
    return (said or [type(error).__name__])[0][:limit]
