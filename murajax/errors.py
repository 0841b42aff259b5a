"""The one exception type for user mistakes.

Anything a user can fix (a bad path, a malformed CSV row, a corrupt image, a bad config value)
raises ``UserError`` with a message that names the file, row or field and says how to fix it.
The ``murajax`` command prints such messages without a traceback; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, config or files, explained in the message."""
