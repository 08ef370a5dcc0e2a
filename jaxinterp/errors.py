"""The base class of every error that jaxinterp raises about its input.

A `JaxinterpError` means the input (a config, a file, a site name, a dictionary that does not fit
a model) is wrong, and its message names the problem and the fix in one line: the launch scripts
print it without a traceback. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class JaxinterpError(ValueError):
    """Bad input, named with its fix in one line."""
