"""Errors that are the user's to fix: main prints the message and exits with status 2."""


class UserError(Exception):
    """A problem with the run's input or environment (config, files, workdir), not a bug."""
