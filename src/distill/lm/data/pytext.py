"""``pytext``: language modelling on CPython's reference-manual topics (``pydoc_data.topics``).

The corpus ships with CPython (no download): a dict of topic name -> English/technical prose. Each
topic is one document; documents are split into train/val/test by a seeded shuffle of the sorted
topic names, so a split is a fixed set of whole documents. The text differs between Python
versions: :func:`corpus_fingerprint` identifies it (for caches and manifests).

The tokenizer is a byte-level BPE trained with HF ``tokenizers`` on the *train* documents only, with
``<pad> <bos> <eos>`` appended after the learned vocabulary (ids ``vocab_size - 3 .. vocab_size - 1``,
so never ``LlamaConfig``'s default ``bos=1, eos=2``). Byte-level means any text round-trips exactly.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distill.errors import RecipeError
from distill.lm.data.text import pack_blocks

SPECIALS = ("<pad>", "<bos>", "<eos>")


def load_topics() -> dict[str, str]:
    """CPython's reference-manual topics, name -> text."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise RecipeError("the pytext task needs pydoc_data.topics, which this Python does not ship") from e
    return dict(topics)


def corpus_fingerprint(topics: dict[str, str] | None = None) -> str:
    """sha256 (first 16 hex digits) of the topics, in sorted-name order."""
    topics = load_topics() if topics is None else topics
    h = hashlib.sha256()
    for k in sorted(topics):
        h.update(k.encode() + b"\0" + topics[k].encode() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    """Document names and texts of the three splits (disjoint; together all topics)."""

    train: dict[str, str]
    val: dict[str, str]
    test: dict[str, str]


def split_documents(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
                    topics: dict[str, str] | None = None) -> Split:
    """Whole-document split: shuffle the sorted names with ``random.Random(seed)``, take test, then val,
    then the rest as train. At least one document per non-zero fraction."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise RecipeError(f"bad split fractions val={val_fraction}, test={test_fraction}")
    topics = load_topics() if topics is None else topics
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    n = len(names)
    n_test = max(1, round(n * test_fraction)) if test_fraction else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction else 0
    if n_test + n_val >= n:
        raise RecipeError(f"{n} documents are too few for the requested val/test fractions")
    test, val, train = names[:n_test], names[n_test:n_test + n_val], names[n_test + n_val:]
    pick = lambda ks: {k: topics[k] for k in sorted(ks)}
    return Split(train=pick(train), val=pick(val), test=pick(test))


def train_bpe(texts: Sequence[str], vocab_size: int = 2048, min_frequency: int = 2) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``; ``vocab_size`` counts the 256
    byte symbols, the merges and the three special tokens. Calling it adds no special tokens (packing
    and :func:`distill.lm.data.text.encode_pair` add ``bos``/``eos`` themselves)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = 256 + len(SPECIALS)
    if vocab_size < base:
        raise RecipeError(f"vocab_size must be at least {base} (256 bytes + {len(SPECIALS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS), min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        clean_up_tokenization_spaces=False,
    )


@dataclass
class PyTextData:
    """Packed blocks per split (``input_ids``, ``attention_mask``, ``labels``, each ``[N, block_size]``),
    the tokenizer and the corpus fingerprint."""

    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    tokenizer: Any
    fingerprint: str


def build_pytext(block_size: int = 128, vocab_size: int = 2048, seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, planted: Sequence[str] = (),
                 planted_seed: int = 0) -> PyTextData:
    """Split, train the BPE on train documents, tokenize and pack every split into blocks.

    ``planted``: extra training documents (canaries), each inserted before a train document drawn by
    ``random.Random(planted_seed)`` (never after the last one), after the BPE is trained: the tokenizer
    never sees them, and val/test never hold them."""
    topics = load_topics()
    sp = split_documents(seed, val_fraction, test_fraction, topics)
    tok = train_bpe(list(sp.train.values()), vocab_size)

    def packed(docs: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in docs]
        return pack_blocks(ids, block_size, tok.bos_token_id, tok.eos_token_id)

    train = list(sp.train.values())
    rng = random.Random(planted_seed)
    for text in planted:
        train.insert(rng.randrange(len(train)), text)
    return PyTextData(packed(train), packed(list(sp.val.values())), packed(list(sp.test.values())), tok,
                      corpus_fingerprint(topics))
