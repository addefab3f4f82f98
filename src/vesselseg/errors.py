"""User-facing errors.

Anything a user can fix (a bad file, a bad param, a missing dataset) is raised as a
:class:`VesselsegError`; the CLI prints its message on one line and exits 1, and only
``--debug`` shows the traceback.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VesselsegError(Exception):
    """An error the user can act on; its message must name the file or param."""


class ParamsError(VesselsegError):
    """A value in params.yaml is missing, mistyped or out of range."""


class DataError(VesselsegError):
    """An input file is missing, unreadable or inconsistent with its partners."""


class DownloadError(VesselsegError):
    """A download or archive could not be fetched, verified or safely extracted."""
