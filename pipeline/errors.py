"""Errors the command line turns into one clear line and exit code 2."""


class UserError(Exception):
    """Bad input or settings: the message alone tells the user what to fix."""
