"""User-facing errors: the CLI prints them without a traceback and exits non-zero."""


class PtmError(Exception):
    """An error caused by the user's input (file, flag, checkpoint); the message names the culprit."""


class DataError(PtmError):
    """Malformed or unusable training/eval data; messages name file and line."""


class CheckpointError(PtmError):
    """A checkpoint that is missing, corrupt, or not what was asked for."""


class MergeError(PtmError):
    """Merge inputs or recipe that cannot be merged; messages list every mismatch."""


class OutputError(MergeError, CheckpointError):
    """An output path that may not be written (exists, overlaps an input or a training run, is not a model)."""


class ConfigError(PtmError):
    """A bad gin binding, recipe or experiment config."""
