"""Expected failures. Each carries a one-line message and the exit code the CLI uses. Also `printable`: user
text made safe to show on a terminal, as messages and tables show it."""
import unicodedata


def printable(text) -> str:
    """User text (notes, tags, labels, dataset folders) with its control characters written out (ESC as \\x1b),
    so a string in a shared store cannot clear the screen or retitle the terminal; newlines and tabs are kept."""
    return "".join(f"\\x{ord(c):02x}" if c not in "\n\t" and unicodedata.category(c) == "Cc" else c
                   for c in str(text))


class EpcliError(Exception):
    """Base class: a failure the user can act on. The CLI prints `error: <message>` and exits `code`."""

    code = 1


class UsageError(EpcliError):
    """Bad arguments (an eps out of range, an unknown norm, T too small...)."""

    code = 2


class NotFoundError(EpcliError):
    """A model, run, checkpoint or dataset that does not exist."""

    code = 3


class UnknownModelError(NotFoundError):
    pass


class DatasetError(EpcliError):
    """A dataset that is missing or malformed."""

    code = 3


class CheckpointError(EpcliError):
    """A checkpoint that does not match the requested model, or is not a checkpoint."""

    code = 4


class StoreError(EpcliError):
    """A store that cannot be opened or written (corrupted, foreign, unwritable)."""

    code = 5


class Diverged(EpcliError):
    """Training produced NaN or exploding values; the last good checkpoint is kept."""

    code = 6


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit or preemption, `kill`, torchrun stopping its workers), raised in
    the CLI's main thread so that the run closes as interrupted, as on Ctrl-C. Exit code 143 (128 + 15)."""

    code = 143

    def __str__(self) -> str:
        return "terminated by SIGTERM"
