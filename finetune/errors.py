"""Mistakes a user can fix. The CLI prints their message as one paragraph and exits 2, without a traceback."""


class UserError(Exception):
    """Base of every error whose message names the file, key or row and says what to do."""
