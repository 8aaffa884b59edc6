"""The one base class of the errors a user can fix: bad input, config, checkpoint, storage or cluster.

Each module defines its own subclass beside the code that raises it (`ConfigError` in config.py,
`StorageError` in storage.py, ...), with a message that says what is wrong and how to fix it. The command
line prints any of them as one line, ``voldit <verb>: error: <message>``, and exits with the class's
``exit_code``; anything else is a bug and keeps its traceback.
"""


class VolditError(Exception):
    """A user error: one line for the user, no traceback."""

    exit_code = 2  # a usage error, as argparse's; a training run that failed says 1
