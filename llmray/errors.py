"""User errors: bad config, bad input, missing artifact. The CLI prints them in one line, no traceback."""


class UserError(Exception):
    """Something the user can fix (a path, a key, a value). The message says what and where."""


class GateRefused(UserError):
    """A release gate measured the candidate and refused to publish it; the message holds the figures."""
