"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DistillError(Exception):
    """Base class: a problem the user can fix; the message says what is wrong and what to do."""


class RecipeError(DistillError):
    """A recipe key is unknown, a value is bad, or a named method/task/arch does not exist."""


class MissingFileError(DistillError):
    """A teacher run, weights file, recipe or data path does not exist."""


class MismatchError(DistillError):
    """Teacher and student disagree (class count, vocabulary)."""


class DataError(DistillError, ValueError):
    """Data passed from Python is unusable: empty, non-finite inputs, labels that are not class indices in range."""


class ModelError(DistillError):
    """A model passed from Python cannot be used: not a module, fails on a real batch, returns no logits."""


class NaNLossError(DistillError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class RunExistsError(DistillError):
    """The run folder already exists with a different recipe."""


class RunLockedError(DistillError):
    """Another process is writing the same run folder."""


class WeightsError(DistillError):
    """A weights file does not match the model it is loaded into (missing, unexpected or mis-shaped tensors)."""


class CorruptCacheError(DistillError):
    """A teacher cache is incomplete, or a shard's bytes do not match the checksum in its manifest."""


class Interrupted(DistillError):
    """Training was interrupted (SIGINT); a checkpoint was written so the run can be resumed."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
