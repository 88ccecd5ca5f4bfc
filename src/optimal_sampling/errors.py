"""Error types shared by every layer.

A `UsageError` is a mistake of the caller (an option, an input file, a path): the CLI prints it as
one line and exits with status 2; the API raises it as the `ValueError` it is.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in how the tool was called (options, input, output path)."""
