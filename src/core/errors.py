"""Errors that end a run with a message instead of a traceback (moetron.train.cli prints them)."""


class UserInputError(Exception):
    """A config, data or checkpoint problem the user can fix; its message names the key and the fix."""
