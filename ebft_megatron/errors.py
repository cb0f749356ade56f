"""The base of every error that a user can fix: a bad setting, input file, checkpoint or layout.

Entry points turn these into one ``error:`` line and exit code 2 (``cli.run_cli``); anything else
is a bug and keeps its traceback. Each package defines its own error types on this base, next to
the code that raises them.
"""


class UserError(Exception):
    """Something the user gave that cannot work, said in one line that names it and what to do."""


class UsageError(UserError, ValueError):
    """A bad setting or input found by an entry point itself."""
