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
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from distill.errors import DataError

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


def tokenize(tokenizer: Any, sentences: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes them) of a batch,
    padded to its longest sentence, ``[CLS] ... [SEP]`` as the teacher was trained on (truncated to
    ``max_length`` tokens; the corpus's sentences are far shorter than all-MiniLM-L6-v2's 256)."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(enc)


def batches(sentences: list[str], batch_size: int, seed: int | None = None) -> list[list[str]]:
    """The sentences cut into batches, shuffled by ``seed`` first (``None``: in order, as for evaluation)."""
    order = list(range(len(sentences)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [[sentences[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
