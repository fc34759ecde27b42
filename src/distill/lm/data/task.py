"""Language-model task data: token datasets, the tokenizer, and what the runner needs (``TaskOps``).

A batch is ``{"input_ids", "attention_mask", "labels", "index"}`` (right-padded; ``labels`` input-aligned
with ``-100`` on prompt and padding; ``index`` the example's position in the split). Prompt-completion
tasks also keep each example's prompt ids (with ``bos``) for generation: on-policy methods and
exact-match evaluation read them by ``index``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.core.distiller import TaskInfo
from distill.errors import RecipeError
from distill.lm import models
from distill.lm.data.text import Example, collate


class TokenDataset(Dataset):
    """Encoded examples, collated a batch at a time; ``prompts[i]`` (ids, with ``bos``) and
    ``references[i]`` (what a verifier checks a completion against) where the task has them;
    ``domains[i]``, an index into ``domain_names``, where the task has domains (data samplers such as
    DDK, S48, mix them; arithmetic: the operation)."""

    def __init__(self, examples: Sequence[Example], pad_id: int, prompts: Sequence[Sequence[int]] | None = None,
                 references: Sequence[Any] | None = None, domains: Sequence[int] | None = None,
                 domain_names: Sequence[str] | None = None) -> None:
        self.examples = list(examples)
        self.pad_id = pad_id
        self.prompts = [list(p) for p in prompts] if prompts is not None else None
        self.references = list(references) if references is not None else None
        self.domains = [int(d) for d in domains] if domains is not None else None
        self.domain_names = list(domain_names) if domain_names is not None else None
        for name, seq in (("prompts", self.prompts), ("references", self.references), ("domains", self.domains)):
            if seq is not None and len(seq) != len(self.examples):
                raise ValueError(f"{len(seq)} {name} for {len(self.examples)} examples")
        if (self.domains is None) != (self.domain_names is None):
            raise ValueError("give both domains and domain_names, or neither")
        if self.domains and not all(0 <= d < len(self.domain_names) for d in self.domains):
            raise ValueError(f"domain ids must index domain_names ({len(self.domain_names)} names)")

    @classmethod
    def from_blocks(cls, blocks: dict[str, Tensor], pad_id: int) -> "TokenDataset":
        """Packed ``[N, block]`` tensors (every token supervised) as a dataset."""
        return cls([Example(i.tolist(), l.tolist()) for i, l in zip(blocks["input_ids"], blocks["labels"])], pad_id)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, idx: Sequence[int] | Tensor) -> dict[str, Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        batch = collate([self.examples[int(i)] for i in idx], self.pad_id)
        batch["index"] = idx
        return batch

    def batches(self, batch_size: int, limit: int | None = None):
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(0, n, batch_size):
            yield self.__getitems__(list(range(i, min(i + batch_size, n))))

    def num_tokens(self) -> int:
        """Supervised (predicted) tokens."""
        return sum(sum(1 for t in e.labels[1:] if t != -100) for e in self.examples)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (16 hex digits) of how the tokenizer turns text into ids (``models.tokenization``): equal iff
    tokenization is interchangeable."""
    return hashlib.sha256(json.dumps(models.tokenization(tokenizer), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LMTaskData:
    """A causal-LM task: three token splits, the tokenizer, an optional verifier, and ``TaskOps``.

    ``verify(completion_text, reference) -> bool`` scores greedy completions of the prompts (exact
    match); ``eval_size`` prompts of the validation split are generated on at each evaluation (all of
    the test split at the end). ``fingerprint`` identifies the data (teacher caches check it).
    """

    name: str
    train: TokenDataset
    val: TokenDataset
    test: TokenDataset
    tokenizer: Any
    fingerprint: str
    default_student: dict[str, Any]
    verify: Callable[[str, Any], bool] | None = None
    max_new_tokens: int = 64
    eval_size: int = 200
    eval_batch_size: int = 64
    meta: dict[str, Any] = field(default_factory=dict)
    # task-specific metrics of a model (canary exposure), reported as test/<name> and teacher/<name>
    extra_metrics: Callable[[nn.Module], dict[str, float]] | None = None

    family = "lm"

    @property
    def vocab(self) -> int:
        return len(self.tokenizer)

    @property
    def domain_names(self) -> list[str] | None:
        """The task's domains (each split's ``domains`` index them), or None."""
        return self.train.domain_names

    # --- TaskOps --------------------------------------------------------------------------------
    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return models.build_lm(spec, self.tokenizer)

    def load_model(self, folder: Path) -> nn.Module:
        tok = models.model_tokenizer(folder)
        if tok is not None:
            models.check_same_tokenizer(tok, self.tokenizer, f"model in {folder}")
        return models.load_causal_lm(folder)

    def saved_spec(self, folder: Path) -> dict[str, Any] | None:
        return None  # an HF folder carries its own config

    def save_model(self, folder: Path, model: nn.Module, spec: dict[str, Any] | None) -> None:
        """HF layout (``config.json`` + ``model.safetensors`` + the tokenizer): loads with
        ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``."""
        with models.quiet_hf():
            model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Vocabulary rows, and every length against every model's context, before any work."""
        splits = (self.train, self.val, self.test)
        longest = max((len(e.input_ids) for d in splits for e in d.examples), default=0)
        prompt = max((len(p) for d in splits if d.prompts is not None for p in d.prompts), default=0)
        for who, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            models.check_vocab(model, self.tokenizer, who)
            ctx = models.context_length(model) or longest
            models.check_context(model, who, longest, f"the task's longest sequence ({longest} tokens)",
                                 f"set task.max_length <= {ctx} (longer sequences are cut)")
            if self.verify is not None and prompt:  # greedy completions are generated at evaluation
                models.check_context(model, who, prompt + self.max_new_tokens,
                                     f"a prompt of {prompt} tokens + task.max_new_tokens={self.max_new_tokens}",
                                     f"set task.max_new_tokens <= {ctx - prompt}")

    def check_generation(self, model: nn.Module, who: str, max_new_tokens: int, key: str) -> None:
        """A method that generates ``max_new_tokens`` after the training prompts fits the model's context."""
        prompt = max((len(p) for p in self.train.prompts or []), default=0)
        ctx = models.context_length(model) or 0
        models.check_context(model, who, prompt + max_new_tokens,
                             f"a prompt of {prompt} tokens + {key}={max_new_tokens}", f"set {key} <= {ctx - prompt}")

    def task_info(self, uses_unlabeled: bool) -> TaskInfo:
        return TaskInfo(self.vocab, len(self.train), (), len(self.train), self.train, self.val, self)

    def open_teacher_cache(self, folder: Path) -> Any:
        from distill.lm.cache import TeacherCache

        return TeacherCache.open(folder, self)

    def evaluator(self, teacher: nn.Module | None) -> Callable[[nn.Module], dict[str, float]]:
        def evaluate(model: nn.Module) -> dict[str, float]:
            return self.metrics(model, teacher, self.val, self.eval_size)

        return evaluate

    def final_metrics(self, student: nn.Module, teacher: nn.Module | None) -> dict[str, float]:
        out = {f"test/{k}": v for k, v in self.metrics(student, teacher, self.test).items()}
        out.update({f"val/{k}": v for k, v in self.metrics(student, teacher, self.val, self.eval_size).items()})
        if self.extra_metrics is not None:
            out.update({f"test/{k}": v for k, v in self.extra_metrics(student).items()})
        if teacher is not None:
            out.update({f"teacher/{k}": v for k, v in self.metrics(teacher, None, self.test).items()})
            if self.extra_metrics is not None:
                out.update({f"teacher/{k}": v for k, v in self.extra_metrics(teacher).items()})
            out["params/teacher"] = models.count_params(teacher)
        out["params/student"] = models.count_params(student)
        return out

    # --- metrics --------------------------------------------------------------------------------
    def metrics(self, model: nn.Module, teacher: nn.Module | None, split: TokenDataset,
                generate: int | None = None) -> dict[str, float]:
        """Perplexity (and NLL) on the split's supervised tokens, token KL(teacher ‖ model) when a teacher
        is given, and exact match of greedy completions (on ``generate`` prompts, default all) with
        generation tokens/s, when the task has a verifier."""
        from distill.lm.metrics import exact_match, token_metrics

        out = token_metrics(model, split, teacher, self.vocab, self.eval_batch_size)
        if self.verify is not None and split.prompts is not None:
            out.update(exact_match(model, split, self.verify, self.tokenizer, self.max_new_tokens,
                                   self.eval_batch_size, generate))
        return out


def require_prompts(info: TaskInfo, method: str) -> TokenDataset:
    """The training set, which must have prompts (on-policy and sequence-level methods generate)."""
    data = info.train
    if getattr(data, "prompts", None) is None:
        raise RecipeError(f"method '{method}' generates completions and needs a prompt/completion task "
                          "(arithmetic, or jsonl with prompt and completion fields)")
    return data
