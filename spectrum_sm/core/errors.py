"""The one exception type that carries a user-facing message."""

from __future__ import annotations


class SpectrumError(Exception):
    """An error the user can fix (bad path, bad percent, corrupt shard...).

    The CLI prints ``str(error)`` on one line and exits non-zero, without a traceback.
    """
