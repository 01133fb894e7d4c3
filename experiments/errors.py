"""The project's user error: a bad input (a flag, a name, a value) detected before any work.

A ``ValueError``, so library callers catch it as one; the CLI prints its one line and exits with status 2.
"""
from __future__ import annotations


class UserError(ValueError):
    """A bad input (a flag, a name, a value) detected before any work: one line, exit status 2 in the CLI."""
