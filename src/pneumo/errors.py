class PneumoError(Exception):
    """A problem the user can fix (bad path, bad config, bad image, wrong checkpoint).

    Command lines print its message as one sentence and exit non-zero instead of a traceback.
    """


class CheckpointError(PneumoError):
    """The checkpoint (or exported model) cannot be used: command lines exit with their own code."""


class OutputLocked(PneumoError):
    """Another run holds the lock on the same output file."""
