"""Errors caused by user input; the CLI prints them as one line, without a traceback."""


class UserError(ValueError):
    """Bad input (arguments, config, files): the message says what to change."""

