"""The one exception type that users can cause.

Library code raises :class:`RhovaeError` (a ``ValueError``) with a one-line message that names the
offending thing and how to fix it; the CLI prints that line without a traceback and exits non-zero.
"""


class RhovaeError(ValueError):
    """A mistake in the user's input (names, sizes, files, configs), stated in one line."""
