"""User-facing error types: the command line prints their message and exits non-zero, no traceback."""


class SocoError(Exception):
    """Base class of every error caused by the user's input (files, folders, configuration)."""


class ConfigError(SocoError):
    """A configuration key, value or preset is invalid."""


class DataError(SocoError):
    """An image folder or data file is missing, empty or unusable."""


class FileWriteError(SocoError):
    """A file could not be written (a full disk, a file size limit, a read-only folder); the file it would replace,
    if any, is intact."""


class ImageReadError(SocoError):
    """One image file could not be read or decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ProposalStoreError(SocoError):
    """A proposal store is missing, corrupt, or does not belong to the given images."""
