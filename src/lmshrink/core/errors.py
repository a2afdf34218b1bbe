"""Errors a user can cause and fix. The CLI prints them as one message and exits with code 2."""


class LmshrinkError(Exception):
    """A problem with the user's input; ``str(err)`` names the input and the fix."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message}\n  fix: {fix}")


class ModelSourceError(LmshrinkError):
    """The model could not be found, fetched or verified."""


class UnsupportedArchitectureError(LmshrinkError):
    """The model's architecture has no adapter."""


class DataSourceError(LmshrinkError):
    """A text source could not be found or read."""


class IntegrityError(LmshrinkError):
    """A downloaded or cached file does not match its recorded sha256."""
