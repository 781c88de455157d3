"""The one exception type for mistakes a user can make (bad files, bad config, bad runs).

The CLI turns it into one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or key at fault."""
