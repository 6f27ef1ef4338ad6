"""User-facing errors.

Anything a user can get wrong (a misspelt method, K larger than the class count, a checkpoint of the
wrong architecture, a corrupt data file) raises :class:`KDLibError`. The command line turns it into a
one-line ``error: ...`` on stderr and exit code 2, without a traceback.
"""


class KDLibError(ValueError):
    """An error caused by the user's input, with a message that says how to fix it."""


def unknown_name(kind: str, name: str, valid) -> KDLibError:
    return KDLibError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
