"""The base class of every error that jaxinterp raises about its input.

A `JaxinterpError` means the input (a config, a file, a site name, an argument, a dictionary that
does not fit a model) is wrong, and its message names the problem and the fix in one line: the
launch scripts print it without a traceback. Anything else that escapes is a bug and keeps its
traceback. Each area has its own subclass (`ConfigError`, `DataError`, `SiteError`, ...); these
are the ones shared across areas.
"""

from __future__ import annotations


class JaxinterpError(ValueError):
    """Bad input, named with its fix in one line."""


class UsageError(JaxinterpError):
    """An argument out of its domain (a sampling setting, a shape, a command-line option)."""


class ModelFileError(JaxinterpError):
    """A model file or checkpoint that cannot be loaded as it is."""


class MissingFileError(JaxinterpError, FileNotFoundError):
    """A file or directory that is not there."""
