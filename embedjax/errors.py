"""The error types every subcommand raises for bad input: one module, first in the layer order, so any module
can raise them and the CLI turns every one into a single line and exit status 2 (no traceback).

Each message names what is wrong and where (file and line, config key, flag)."""
from __future__ import annotations


class EmbedjaxError(ValueError):
    """Bad input that the user can fix; printed as one line by the CLI."""


class ConfigError(EmbedjaxError):
    """A config key, value or named choice that the code does not honour."""


class ShardingError(EmbedjaxError):
    """A mesh or sharding request that cannot be satisfied by the devices / rules."""


class DataError(EmbedjaxError):
    """Bad input data; the message names the file (and line) and what is wrong."""


class STSFormatError(DataError):
    """A malformed line in an STS file; the message names the file, line and field."""


class ModelLoadError(EmbedjaxError):
    """A model folder or hub id that cannot be loaded; the message names the file."""


class TokenizerMismatchError(EmbedjaxError):
    """The tokenizer does not belong to the model (different ids, or ids outside the model's vocabulary)."""


class ExportError(EmbedjaxError):
    """A model / workdir that cannot be exported; the message names the path and what is wrong."""


class AotError(EmbedjaxError):
    """Bad --topology / config for an ahead-of-time compile (one-line message)."""


class CLIError(EmbedjaxError):
    """A command-line usage error (a missing extra, a bad flag combination)."""
