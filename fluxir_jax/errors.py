"""The one exception type for user mistakes.

Anything a user can fix (a bad path, a wrong checkpoint, a bad image, a bad config key) raises
`UserError` with one line naming the thing that is wrong. The CLI prints that line and exits
with code 2; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message is the whole explanation (one line)."""

    exit_code = 2
