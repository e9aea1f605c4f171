"""Every error a user can cause, in one place.

All are ``ValueError`` subclasses whose message names the problem and the fix; the ``equiforce``
command prints them in one line without a traceback. This module imports nothing, so reading a
data file or an exported file never loads the network to get an error class.
:func:`reject_unknown_keys` is the one check for unknown settings (training config, model config).
"""


class UserError(ValueError):
    """A mistake in the user's input (file, setting, checkpoint): reported in one line, no traceback."""


class ConfigError(UserError):
    """A bad configuration file or setting."""


class DataError(UserError):
    """A data file that cannot be used for training or evaluation."""


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint."""


class ModelFileError(UserError):
    """An exported file that is missing, unreadable, not an equiforce export, or of an unknown version."""


class DatagenError(UserError):
    """Bad arguments for data generation (message names the problem and the fix)."""


def reject_unknown_keys(given, known, what: str = "setting") -> None:
    """ConfigError listing the keys of ``given`` that are not in ``known`` (with the closest known
    name for each, when one is close), and every known key; nothing when all are known."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    import difflib  # standard library; imported here so that this module imports nothing up front

    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
        if close:
            hints.append(f"'{key}' -> '{close[0]}'?")
    hint = f" (did you mean {', '.join(hints)})" if hints else ""
    raise ConfigError(f"unknown {what}(s) {unknown}{hint}; known {what}s: {sorted(known)}")
