"""User-facing errors.

Anything a user can get wrong (a misspelt method, K larger than the class count, a checkpoint of the
wrong architecture, a corrupt data file) raises :class:`KDLibError`. The command line turns it into a
one-line ``error: ...`` on stderr and exit code 2, without a traceback.
"""


class KDLibError(ValueError):
    """An error caused by the user's input, with a message that says how to fix it."""


def unknown_name(kind: str, name: str, valid) -> KDLibError:
    return KDLibError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


def check_keys(given, valid, kind: str, where: str = "", shown=None) -> None:
    """Refuse the keys of ``given`` that are not in ``valid``, listing the valid ones (``shown``: as a user writes them)."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise KDLibError(f"{where}unknown {kind} {', '.join(map(repr, unknown))}; valid {kind}s: "
                         f"{', '.join(shown or valid)}")


def whole_number(value, name: str, minimum: int = 1) -> int:
    """``value`` as an integer >= ``minimum`` (``"3"`` too: flags and grid files), else a one-line error."""
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise KDLibError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number
