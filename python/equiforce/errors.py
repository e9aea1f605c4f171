"""Every error a user can cause, in one place.

All are ``ValueError`` subclasses whose message names the problem and the fix; the ``equiforce``
command prints them in one line without a traceback. This module imports nothing, so reading a
data file or an exported file never loads the network to get an error class.
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
