"""User-facing errors: one clear message that names the key, file, column or shape at fault."""


class LGTMError(ValueError):
    """Base class of every error LGTM-DS raises for bad user input."""


class ConfigError(LGTMError):
    """A bad experiment config, command-line override or DeepSpeed JSON."""


class DataError(LGTMError):
    """A bad dataset: unknown task, missing file or column, empty split."""


class ModelError(LGTMError):
    """Teacher and student that cannot be distilled into each other (e.g. label counts differ)."""


class TrainingError(LGTMError):
    """A run that cannot go on (training diverged: too many skipped steps in a row)."""
