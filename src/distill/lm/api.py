"""``distill.distill`` for language models: HF causal LMs, their tokenizer, and text or prompt/completion
data passed from Python (strings, ``{"prompt", "completion"}`` / ``{"text"}`` mappings, or a JSONL path).

    result = distill.distill(teacher, student, train=[{"prompt": "2+2=", "completion": "4"}, ...],
                             tokenizer=tok, method="lm_kd", method_params={"kind": "jsd", "beta": 0.5})
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import DataError, RecipeError
from distill.lm.data.task import LMTaskData
from distill.lm.data.tasks import JsonlParams, task_from_records
from distill.lm.data.text import TextRecord, load_records


def as_records(data: Any, arg: str) -> list[TextRecord]:
    """A split given from Python as text records; errors name the argument."""
    if isinstance(data, (str, Path)):  # a JSONL file or a datasets folder (a missing one is named)
        return load_records(Path(data))
    if not isinstance(data, Sequence) or not data:
        raise DataError(f"{arg}: give a non-empty list of strings or of {{'prompt', 'completion'}} / {{'text'}} "
                        "mappings, or a JSONL path")
    out = []
    for i, r in enumerate(data):
        if isinstance(r, TextRecord):
            out.append(r)
        elif isinstance(r, str):
            out.append(TextRecord(text=r))
        elif isinstance(r, Mapping) and isinstance(r.get("prompt"), str) and isinstance(r.get("completion"), str):
            out.append(TextRecord(prompt=r["prompt"], completion=r["completion"]))
        elif isinstance(r, Mapping) and isinstance(r.get("text"), str):
            out.append(TextRecord(text=r["text"]))
        else:
            raise DataError(f"{arg}[{i}]: expected a string or a mapping with string 'prompt' and 'completion' "
                            f"(or 'text'), got {type(r).__name__}")
    if len({r.kind for r in out}) > 1:
        raise DataError(f"{arg}: mixes text and prompt/completion records; use one kind")
    return out


def lm_task(tokenizer: Any, train: Any, val: Any = None, test: Any = None, **params: Any) -> LMTaskData:
    """The task of a Python LM distillation: ``params`` are the ``jsonl`` task's (``max_length``,
    ``max_new_tokens``, ``eval_size``, ``val_fraction``, ...)."""
    if not hasattr(tokenizer, "get_vocab") or getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError("tokenizer: give the models' HF tokenizer (with an eos token)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice; padding is masked everywhere
    try:
        p = JsonlParams(train="<python>", tokenizer="<python>", **params)
    except Exception as err:  # pydantic's ValidationError: name the bad key
        raise RecipeError(f"task_params: {str(err).splitlines()[1] if len(str(err).splitlines()) > 1 else err}") from None
    records = {k: as_records(v, k) for k, v in (("train", train), ("val", val), ("test", test)) if v is not None}
    digest = hashlib.sha256(json.dumps({k: [vars(r) for r in v] for k, v in records.items()}).encode()).hexdigest()
    return task_from_records(records, tokenizer, p, digest[:16])


def is_causal_lm(model: Any) -> bool:
    return isinstance(model, nn.Module) and callable(getattr(model, "generate", None)) and \
        callable(getattr(model, "get_input_embeddings", None))
