"""``arithmetic``: synthetic multi-digit arithmetic with a step-by-step trace and a verifier.

A problem is ``a + b``, ``a - b`` or ``a * d`` (``d`` one digit). The prompt is the problem and a
newline; the completion works the columns right to left, one line each, then gives the answer on a
line starting with ``#``. Each step line is itself a true Python equation, then ``|`` and the result
digits found so far (the last step writes its full value, carry included)::

    prompt      "347+589\\n"
    completion  "7+9+0=16|6\\n4+8+1=13|36\\n3+5+1=9|936\\n#936"

- addition: ``x+y+c=s`` (``c`` the carry in, ``s`` the column sum; carry out ``s // 10``);
- subtraction: ``x-y-b=r`` or, when the column borrows, ``1x-y-b=r`` (i.e. ``10 + x - y - b``); a
  negative result starts with the line ``a<b`` and works ``b - a``, answer ``#-...``;
- multiplication by a digit: ``x*d+c=s``.

Shorter operands are padded with ``0`` digits in the columns. :func:`verify` reads only the answer
line, so a model is scored on exact match of the final answer (greedy decoding).

The tokenizer is character-level over a fixed 19-character alphabet plus ``<pad> <bos> <eos> <unk>``,
placed *after* the characters so their ids (19–22) differ from ``LlamaConfig``'s defaults
(``bos=1, eos=2``): a model built with the defaults would stop at the digit ``2`` — a bug the tests
would catch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from distill.errors import RecipeError
from distill.lm.data.text import Example, encode_pair

Op = Literal["+", "-", "*"]
ALPHABET = "0123456789+-*=#|<\n "
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


# ----------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """``a op b`` with its exact answer."""

    a: int
    op: Op
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}\n"

    @property
    def completion(self) -> str:
        return trace(self)


@dataclass(frozen=True)
class Difficulty:
    """Operand sizes and operations. Each operand of ``+``/``-`` has between ``min_digits`` and
    ``max_digits`` digits (drawn per operand); ``*`` multiplies such a number by one digit 2–9.
    ``negative`` allows ``a - b`` with ``a < b``."""

    min_digits: int = 1
    max_digits: int = 3
    ops: tuple[Op, ...] = ("+", "-")
    negative: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise RecipeError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not self.ops or any(o not in ("+", "-", "*") for o in self.ops):
            raise RecipeError(f"ops must be a non-empty subset of '+', '-', '*', got {self.ops!r}")


def _number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    n = rng.randint(lo_digits, hi_digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def sample_problem(rng: random.Random, difficulty: Difficulty = Difficulty()) -> Problem:
    """One problem drawn with ``rng`` (never the global RNG)."""
    op: Op = rng.choice(difficulty.ops)
    a = _number(rng, difficulty.min_digits, difficulty.max_digits)
    if op == "*":
        return Problem(a, op, rng.randint(2, 9))
    b = _number(rng, difficulty.min_digits, difficulty.max_digits)
    if op == "-" and a < b and not difficulty.negative:
        a, b = b, a
    return Problem(a, op, b)


def generate_problems(n: int, seed: int, difficulty: Difficulty = Difficulty()) -> list[Problem]:
    """``n`` problems from a private ``random.Random(seed)``: the same seed gives the same list."""
    rng = random.Random(seed)
    return [sample_problem(rng, difficulty) for _ in range(n)]


# -------------------------------------------------------------------------------------------- trace


def _digits(x: int, width: int) -> list[int]:
    """Digits of ``x`` from the least significant, zero-padded to ``width``."""
    return [int(c) for c in reversed(str(x).zfill(width))]


def trace(p: Problem) -> str:
    """The step-by-step completion for ``p`` (see the module docstring), ending with ``#answer``."""
    lines: list[str] = []
    a, b, sign = p.a, p.b, ""
    if p.op == "-" and a < b:
        lines.append(f"{a}<{b}")
        a, b, sign = b, a, "-"
    if p.op == "*":
        xs = _digits(a, len(str(a)))
        carry, out = 0, ""
        for i, x in enumerate(xs):
            s = x * b + carry
            carry = s // 10
            out = (str(s) if i == len(xs) - 1 else str(s % 10)) + out
            lines.append(f"{x}*{b}+{s - x * b}={s}|{out}")
    else:
        width = max(len(str(a)), len(str(b)))
        xs, ys = _digits(a, width), _digits(b, width)
        c, out = 0, ""
        for i, (x, y) in enumerate(zip(xs, ys)):
            last = i == width - 1
            if p.op == "+":
                s = x + y + c
                out = (str(s) if last else str(s % 10)) + out
                lines.append(f"{x}+{y}+{c}={s}|{out}")
                c = s // 10
            else:
                borrow = 1 if x - y - c < 0 else 0
                r = 10 * borrow + x - y - c
                out = str(r) + out
                lines.append(f"{'1' if borrow else ''}{x}-{y}-{c}={r}|{out}")
                c = borrow
    lines.append(f"#{sign}{int(out)}")
    return "\n".join(lines)


_ANSWER = re.compile(r"^#(-?\d+)\s*$")


def parse_answer(completion: str) -> int | None:
    """The integer on the first line that starts with ``#``, or None when there is none or it is malformed."""
    for line in completion.split("\n"):
        if line.startswith("#"):
            m = _ANSWER.match(line)
            return int(m.group(1)) if m else None
    return None


def verify(completion: str, problem: Problem) -> bool:
    """True iff the completion's answer line gives exactly ``problem.answer``."""
    got = parse_answer(completion)
    return got is not None and got == problem.answer


def exact_match(completions: Sequence[str], problems: Sequence[Problem]) -> float:
    """Fraction of completions that :func:`verify` accepts."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    if not problems:
        return 0.0
    return sum(verify(c, p) for c, p in zip(completions, problems)) / len(problems)


# ---------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class CharTokenizer:
    """Character-level tokenizer over :data:`ALPHABET`; special ids follow the characters."""

    alphabet: str = ALPHABET
    vocab: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        v = {c: i for i, c in enumerate(self.alphabet)}
        for s in SPECIALS:
            v[s] = len(v)
        object.__setattr__(self, "vocab", v)

    @property
    def pad_token_id(self) -> int:
        return self.vocab["<pad>"]

    @property
    def bos_token_id(self) -> int:
        return self.vocab["<bos>"]

    @property
    def eos_token_id(self) -> int:
        return self.vocab["<eos>"]

    @property
    def unk_token_id(self) -> int:
        return self.vocab["<unk>"]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters (no special tokens); unknown characters map to ``<unk>``."""
        return [self.vocab.get(c, self.unk_token_id) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        inv = {i: s for s, i in self.vocab.items()}
        specials = {self.vocab[s] for s in SPECIALS}
        return "".join(inv[int(i)] for i in ids if not (skip_special_tokens and int(i) in specials))

    def to_hf(self) -> Any:
        """The same tokenizer as an HF ``PreTrainedTokenizerFast`` (``tokenizers`` WordLevel over single
        characters); calling it adds ``<bos>`` in front, like the prompts a model is trained on."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel(dict(self.vocab), unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", self.bos_token_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
            clean_up_tokenization_spaces=False,
        )


# ----------------------------------------------------------------------------------------- examples


def encode_problem(p: Problem, tok: CharTokenizer, max_length: int | None = None) -> Example:
    """``[bos] prompt completion [eos]``; only the completion and ``eos`` are supervised."""
    return encode_pair(tok.encode(p.prompt), tok.encode(p.completion), tok.bos_token_id, tok.eos_token_id, max_length)


def encode_prompt(p: Problem, tok: CharTokenizer) -> Example:
    """``[bos] prompt`` with no labels, for generation (collate with ``padding_side="left"``)."""
    ids = [tok.bos_token_id] + tok.encode(p.prompt)
    return Example(ids, [-100] * len(ids))


def build_examples(
    n: int, seed: int, difficulty: Difficulty = Difficulty(), tok: CharTokenizer | None = None
) -> tuple[list[Problem], list[Example]]:
    """``n`` seeded problems and their encoded training examples."""
    tok = tok or CharTokenizer()
    problems = generate_problems(n, seed, difficulty)
    return problems, [encode_problem(p, tok) for p in problems]
