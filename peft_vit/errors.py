"""The project's own errors: problems a user can fix, each message naming the thing and the fix.

``train.py`` prints one of these as one line, ``[peft-vit] <Class>: <message>``, without a
traceback (and into the run's train.log); ``PEFT_VIT_TRACEBACK=1`` shows the full trace. Every
class also derives from the built-in it stands for (``ValueError``, ``FileNotFoundError``, …),
so ``except ValueError`` still catches it. At the bottom of the package: any room may import it.
"""
from __future__ import annotations


class PeftVitError(Exception):
    """The common base: a known problem with a message naming it and its fix."""


class ConfigValueError(PeftVitError, ValueError):
    """A config value that cannot work; the message names its key (``optim.lr=-0.001: ...``)."""


class DataMissingError(PeftVitError, FileNotFoundError):
    """A dataset, list file or image that is not where the config says; the message says how to get it."""


class DataError(PeftVitError, ValueError):
    """Data that is there but wrong (a malformed list line, a label out of range)."""


class DownloadUnreachableError(PeftVitError, ConnectionError):
    """A source download whose host cannot be reached (offline); the message names the host and the
    way to get the data without network."""


class WeightsFileError(PeftVitError, OSError):
    """A weights file that is missing or cannot be read as any format that works."""


class WeightsNotFoundError(WeightsFileError, FileNotFoundError):
    """``model.checkpoint`` names no file."""


class NonFiniteLossError(PeftVitError, FloatingPointError):
    """The training loss became NaN or infinite."""
