"""Errors meant for the user: the CLI prints their one-line message (no traceback) and exits 2."""

__all__ = ["UserError", "ConfigError", "DatasetNotFoundError"]


class UserError(Exception):
    """A problem with the user's input that the message explains how to fix."""


class ConfigError(UserError, ValueError):
    """A config file or override is wrong (unknown key, unregistered name, impossible value)."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A registered dataset's files are not where its registration looks for them."""
