"""The one exception type the command line turns into a one-line message."""


class UserError(ValueError):
    """Bad input or configuration: the message names the problem and the fix."""
