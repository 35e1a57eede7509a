"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class MiniGPTError(Exception):
    """A user-facing error: bad input, bad config, unusable checkpoint. Message is one line."""

    exit_code = 1


class ConfigError(MiniGPTError):
    """Impossible or unknown hyperparameters."""


class DataError(MiniGPTError):
    """Input text or prepared data that cannot be used."""


class CheckpointError(MiniGPTError):
    """A run directory or checkpoint that is missing, corrupted or incompatible."""


class TokenizerError(MiniGPTError):
    """Text the tokenizer cannot encode (e.g. characters it has never seen)."""


class TrainingDiverged(MiniGPTError):
    """Too many steps in a row with a non-finite loss or gradient."""
