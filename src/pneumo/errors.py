class PneumoError(Exception):
    """A problem the user can fix (bad path, bad config, bad image, wrong checkpoint).

    Command lines print its message as one sentence and exit non-zero instead of a traceback.
    """
