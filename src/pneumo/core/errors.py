"""Errors a user can cause and fix. Command lines print their message as one sentence and exit with
the error's `exit_code` instead of a traceback (1 stays reserved for bugs)."""


class PneumoError(Exception):
    """A problem with the input: a bad path, config, image, argument or data split."""

    exit_code = 2


class ConfigError(PneumoError):
    """A config file or `--set` override that cannot be used; the message names the file and the key."""


class BadImageError(PneumoError):
    """A file that cannot be used as an image; `reason` says why, in a few words."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot use image {path}: {reason}")
        self.path, self.reason = path, reason


class CheckpointError(PneumoError):
    """The checkpoint (or exported model) cannot be used."""

    exit_code = 3


class OutputLocked(PneumoError):
    """Another run holds the lock on the same output file or run directory."""

    exit_code = 5
