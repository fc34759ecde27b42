"""PPCL (S15, Ma et al. 2025, "Pluggable Pruning with Contiguous Layer Distillation for Diffusion
Transformers", arXiv 2511.16156), depth pruning only, for HF causal language models.

The paper's training code is not public (OPPO-Mente-Lab/Qwen-Image-Pruning ships inference only); we
follow its abstract and method overview: redundancy in deep transformers is contiguous in depth, so
(1) find a redundant *interval* of layers with linear probes and the first-order trend of a similarity
metric (CKA) along depth, (2) drop it, (3) distil the pruned model layer by layer *non-sequentially*:
each kept layer receives the teacher's hidden state as input (so no error propagates from earlier
layers) and is matched to the teacher's output at the same depth.

Notation: ``h_0`` is the input of the first decoder layer, ``h_{i+1}`` the output of layer ``i``
(``L`` layers), collected on real (unpadded) tokens of the task's training split.

Scores (:func:`layer_scores`):

- ``cka[i] = CKA(h_i, h_{i+1})`` (``features.losses.linear_cka``, tokens as samples): how little layer
  ``i`` changes its input; ``trend[i] = cka[i+1] − cka[i]``, the first-order difference along depth
  (a plateau, trend ≈ 0 at high CKA, marks a redundant interval);
- per candidate span ``[a, a+K)``: ``span_cka = CKA(h_a, h_{a+K})`` and the linear probe
  ``probe_r2``: a ridge regression ``h_a → h_{a+K}`` fitted on half of the tokens, its R² on the other
  half (how well a linear map replaces the span);
- ``score = (probe_r2 + span_cka) / 2``; the span with the highest score is dropped.

Distillation (:func:`distill_layers`): student layer ``s`` (teacher layer ``kept[s]``) is matched to
``h_{kept[s]+1}`` (the last student layer always to ``h_L``) by the FitNets hint (MSE,
``features.losses.hint_loss``, summed over layers); ``mode="teacher_forced"`` (the paper's
non-sequential scheme) feeds each student layer the teacher state its predecessor is matched to, so the
first layer after the dropped span learns to map ``h_a`` to ``h_{a+K+1}``; ``mode="sequential"`` runs
the student on its own states. Only the decoder layers train; embeddings, final norm and head stay the
teacher's.

Ours: the score's combination of probe and CKA, tokens as CKA samples, the ridge strength, the
per-layer MSE sum, training only the layers, AdamW and its learning rate; no width pruning and no
"plug-and-play" alternation across several pruning ratios (the paper's second part).
"""

from __future__ import annotations

import copy
import csv
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.errors import MissingFileError, RecipeError
from distill.features.losses import hint_loss, linear_cka
from distill.features.tap import FeatureTap, default_layers
from distill.core.rundir import tool_output

Mode = Literal["teacher_forced", "sequential"]


# --- layers ---------------------------------------------------------------------------------------

def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's blocks: the longest ``nn.ModuleList`` of one block class (``model.layers``)."""
    names = default_layers(model)
    path = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
    mods = model.get_submodule(path) if path else model
    return path, mods


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _names(path: str, n: int) -> list[str]:
    return [f"{path}.{i}" if path else str(i) for i in range(n)]


@torch.no_grad()
def hidden_states(model: nn.Module, batch: dict[str, Tensor]) -> list[Tensor]:
    """``[h_0, ..., h_L]`` (each ``[batch, seq, hidden]``) of one forward of ``model`` on ``batch``."""
    path, layers = layer_list(model)
    seen: dict[str, Tensor] = {}
    pre = layers[0].register_forward_pre_hook(lambda m, a, k: seen.__setitem__("in", _hidden_arg(a, k)),
                                              with_kwargs=True)
    try:
        with FeatureTap(model, _names(path, len(layers))) as tap:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            outs = tap.features()
    finally:
        pre.remove()
    return [seen["in"], *outs]


def drop_span(model: nn.Module, start: int, k: int) -> nn.Module:
    """A copy of ``model`` without decoder layers ``start .. start+k-1``: the config's layer count (and
    per-layer ``layer_types``) and each kept layer's ``layer_idx`` (the KV-cache slot) follow."""
    path, layers = layer_list(model)
    n = len(layers)
    if not (1 <= k < n and 0 <= start <= n - k):
        raise RecipeError(f"cannot drop {k} layers from {start} in a {n}-layer model (keep at least one)")
    m = copy.deepcopy(model)
    _, layers = layer_list(m)
    del layers[start:start + k]
    for i, layer in enumerate(layers):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = i
    cfg = getattr(m, "config", None)
    if cfg is not None:
        cfg.num_hidden_layers = len(layers)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            cfg.layer_types = [t for i, t in enumerate(types) if not start <= i < start + k]
    return m


# --- scores ---------------------------------------------------------------------------------------

def ridge_r2(x: Tensor, y: Tensor, x_eval: Tensor, y_eval: Tensor, alpha: float = 1e-3) -> float:
    """Held-out R² of the ridge regression ``y ≈ (x − μx) W + μy`` fitted on ``(x, y)``, ``λ = alpha ·
    tr(XᵀX)/d``: ``1 − Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`` on ``(x_eval, y_eval)``."""
    x, y, x_eval, y_eval = (t.double() for t in (x, y, x_eval, y_eval))
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    lam = alpha * gram.trace() / gram.shape[0]
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ (y - my))
    pred = (x_eval - mx) @ w + my
    sst = (y_eval - y_eval.mean(0)).pow(2).sum()
    return float(1.0 - (pred - y_eval).pow(2).sum() / sst.clamp_min(1e-12))


@dataclass
class LayerScores:
    cka: list[float]  # CKA(h_i, h_{i+1}), one per layer
    trend: list[float]  # first-order difference of cka along depth
    spans: list[dict[str, float]]  # per start a: span_cka, probe_r2, score
    drop: int
    tokens: int


def collect_tokens(model: nn.Module, split: Any, max_tokens: int, seed: int, batch_size: int = 16) -> list[Tensor]:
    """``[h_0 .. h_L]`` as ``[tokens, hidden]`` over up to ``max_tokens`` real tokens of ``split``, the
    examples drawn in a seeded order."""
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    was = model.training
    model.eval()
    got: list[list[Tensor]] = []
    n = 0
    try:
        for i in range(0, len(order), batch_size):
            batch = split.__getitems__(order[i:i + batch_size])
            mask = batch["attention_mask"].bool()
            hs = hidden_states(model, batch)
            got.append([h[mask].float() for h in hs])
            n += int(mask.sum())
            if n >= max_tokens:
                break
    finally:
        model.train(was)
    return [torch.cat([g[j] for g in got])[:max_tokens] for j in range(len(got[0]))]


def layer_scores(hs: list[Tensor], drop: int, seed: int = 0) -> LayerScores:
    """The scores of the module docstring from ``[h_0 .. h_L]`` (``[tokens, hidden]`` each)."""
    n_layers = len(hs) - 1
    cka = [float(linear_cka(hs[i], hs[i + 1])) for i in range(n_layers)]
    trend = [cka[i + 1] - cka[i] for i in range(n_layers - 1)]
    perm = torch.randperm(hs[0].shape[0], generator=torch.Generator().manual_seed(seed))
    fit, ev = perm[: len(perm) // 2], perm[len(perm) // 2:]
    spans = []
    for a in range(n_layers - drop + 1):
        x, y = hs[a], hs[a + drop]
        span_cka = float(linear_cka(x, y))
        r2 = ridge_r2(x[fit], y[fit], x[ev], y[ev])
        spans.append({"start": a, "span_cka": span_cka, "probe_r2": r2, "score": (span_cka + r2) / 2})
    return LayerScores(cka, trend, spans, drop, int(hs[0].shape[0]))


def choose_span(scores: LayerScores) -> int:
    """The start of the span with the highest score (the earliest on a tie)."""
    return max(scores.spans, key=lambda s: (s["score"], -s["start"]))["start"]


# --- layer-wise distillation ----------------------------------------------------------------------

def layer_targets(n_layers: int, start: int, k: int) -> tuple[list[int], list[int]]:
    """For each student layer ``s``: the teacher state it is matched to (``h_{kept[s]+1}``, the last one
    ``h_L``) and, teacher-forced, the state it is fed (its predecessor's target; ``h_0`` for the first)."""
    kept = [j for j in range(n_layers) if not start <= j < start + k]
    tgt = [j + 1 for j in kept]
    tgt[-1] = n_layers
    return tgt, [0, *tgt[:-1]]


def layerwise_loss(student_out: list[Tensor], teacher_hs: list[Tensor], targets: list[int], mask: Tensor) -> Tensor:
    """``Σ_s MSE(student layer s's output, h_{targets[s]})`` over real tokens (``hint_loss``)."""
    return sum(hint_loss(o, teacher_hs[t], mask=mask) for o, t in zip(student_out, targets))


def _batches(split: Any, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(split), generator=g).split(batch_size):
            yield split.__getitems__(idx.tolist())


def distill_layers(student: nn.Module, teacher: nn.Module, start: int, k: int, split: Any, steps: int,
                   lr: float = 1e-3, batch_size: int = 16, mode: Mode = "teacher_forced", seed: int = 0) -> list[float]:
    """Train ``student`` (``teacher`` without layers ``start .. start+k-1``) layer-wise for ``steps`` AdamW
    steps on batches of ``split``; returns the loss per step. Only the decoder layers train."""
    if mode not in ("teacher_forced", "sequential"):
        raise RecipeError(f"mode '{mode}': use teacher_forced or sequential")
    path, layers = layer_list(student)
    n_teacher = len(layer_list(teacher)[1])
    if len(layers) != n_teacher - k:
        raise RecipeError(f"the student has {len(layers)} layers; expected {n_teacher} − {k}")
    targets, inputs = layer_targets(n_teacher, start, k)
    teacher.eval()
    student.train()
    for p in student.parameters():
        p.requires_grad_(False)
    params = list(layers.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    current: dict[str, list[Tensor]] = {}
    hooks = []
    if mode == "teacher_forced":
        for s, layer in enumerate(layers):
            def feed(m: nn.Module, args: tuple, kwargs: dict, i: int = inputs[s]) -> tuple[tuple, dict]:
                return _with_hidden(args, kwargs, current["h"][i])
            hooks.append(layer.register_forward_pre_hook(feed, with_kwargs=True))
    losses = []
    try:
        with FeatureTap(student, _names(path, len(layers))) as tap:
            it = _batches(split, batch_size, seed)
            for _ in range(steps):
                batch = next(it)
                current["h"] = hidden_states(teacher, batch)
                student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                loss = layerwise_loss(tap.features(), current["h"], targets, batch["attention_mask"].bool())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for h in hooks:
            h.remove()
        for p in student.parameters():
            p.requires_grad_(True)
    return losses


# --- the tool -------------------------------------------------------------------------------------

@dataclass
class SpanRun:
    name: str  # ppcl | last | random
    start: int
    ppl_dropped: float
    ppl_distilled: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None


@dataclass
class PPCLResult:
    model: str
    task: str
    layers: int
    drop: int
    steps: int
    mode: str
    seed: int
    teacher_ppl: float
    params_teacher: int
    params_pruned: int
    scores: LayerScores
    runs: list[SpanRun] = field(default_factory=list)


def resolve_model(model: str, task: str | None, task_set: list[str], runs: Path,
                  progress: Callable[[str], None]) -> tuple[Path, Any]:
    """The model folder and its LM task: a recipe (trained once into ``<runs>/_teachers``, as a teacher
    recipe is), a run folder (its recipe's task) or an HF model folder (``task``, e.g. ``jsonl`` with
    ``train=FILE``; its ``tokenizer`` defaults to the model folder)."""
    from distill.core.recipe import load_recipe, recipe_from_dict
    from distill.core.refs import trained_folder
    from distill.core.runner import build_task, run_recipe
    from distill.lm.tools.traces import build_lm_task

    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "recipe.yaml").is_file() and task is None:
            import yaml

            r = recipe_from_dict(yaml.safe_load((p / "recipe.yaml").read_text()), base_dir=p)
            return p, build_task(r)
        if task is None:
            raise RecipeError(f"{p} is a model folder without a recipe: name its data with --task (e.g. --task jsonl "
                              "--task-set train=FILE)")
        extra = [] if task != "jsonl" or any(s.startswith("tokenizer=") for s in task_set) else [f"tokenizer={p}"]
        return p, build_lm_task(task, [*task_set, *extra])
    try:
        r = load_recipe(model, task_set)
    except MissingFileError:
        raise MissingFileError(f"'{model}' is neither a model or run folder nor a recipe") from None
    folder = trained_folder(runs, r)
    if not (folder / "metrics.json").is_file():
        progress(f"training {r.name} into {folder}")
        run_recipe(r, out=folder.parent, name=folder.name, progress=False, wait=True)
    return folder, build_task(r)


def perplexity(model: nn.Module, data: Any, limit: int | None = None) -> float:
    from distill.lm.metrics import token_metrics

    split = data.test
    if limit is not None and limit < len(split):
        from distill.lm.data.task import TokenDataset

        split = TokenDataset(split.examples[:limit], split.pad_id)
    return token_metrics(model, split, None, data.vocab, 32)["perplexity"]


def run_ppcl(model: str, drop: int, steps: int = 200, *, mode: Mode = "teacher_forced", span: int | None = None,
             task: str | None = None, task_set: list[str] | None = None, runs: Path = Path("runs"), seed: int = 0,
             baselines: bool = False, lr: float = 1e-3, batch_size: int = 16, probe_tokens: int = 4096,
             eval_limit: int | None = None,
             progress: Callable[[str], None] | None = None) -> tuple[PPCLResult, nn.Module, Any]:
    """Score the spans of ``drop`` layers, drop the best (or ``span``, a start), distil layer-wise for
    ``steps``; with ``baselines`` also the last span and a random one (seeded), each dropped and distilled
    alike. Returns the result, the pruned (distilled) model and the task data."""
    say = progress or (lambda m: None)
    folder, data = resolve_model(model, task, task_set or [], runs, say)
    if getattr(data, "family", None) != "lm":
        raise RecipeError("prune-layers works on causal language models (an LM task)")
    teacher = data.load_model(folder)
    n = len(layer_list(teacher)[1])
    if not 1 <= drop < n:
        raise RecipeError(f"--drop {drop}: the model has {n} layers; drop between 1 and {n - 1}")
    if span is not None and not 0 <= span <= n - drop:
        raise RecipeError(f"--span {span}: a span of {drop} layers starts between 0 and {n - drop}")
    torch.manual_seed(seed)
    say(f"scoring spans of {drop} of {n} layers on {probe_tokens} tokens")
    scores = layer_scores(collect_tokens(teacher, data.train, probe_tokens, seed), drop, seed)
    chosen = choose_span(scores) if span is None else span
    plan = [("ppcl" if span is None else "given", chosen)]
    if baselines:
        plan += [("last", n - drop), ("random", random.Random(seed).randrange(n - drop + 1))]
    res = PPCLResult(str(model), data.name, n, drop, steps, mode, seed, perplexity(teacher, data, eval_limit),
                     sum(p.numel() for p in teacher.parameters()), 0, scores)
    kept_model = None
    for name, start in plan:
        student = drop_span(teacher, start, drop)
        run = SpanRun(name, start, perplexity(student, data, eval_limit))
        if steps:
            say(f"distilling layer-wise without layers {start}..{start + drop - 1} ({name}), {steps} steps")
            losses = distill_layers(student, teacher, start, drop, data.train, steps, lr, batch_size, mode, seed)
            run.ppl_distilled, run.loss_first, run.loss_last = perplexity(student, data, eval_limit), losses[0], losses[-1]
        res.runs.append(run)
        if kept_model is None:
            kept_model = student
            res.params_pruned = sum(p.numel() for p in student.parameters())
    return res, kept_model, data


# --- outputs --------------------------------------------------------------------------------------

MARKER = "ppcl.json"


def markdown(res: PPCLResult) -> str:
    sc = res.scores
    lines = ["# PPCL layer pruning (S15)", "",
             f"Model `{res.model}` ({res.layers} layers, {res.params_teacher} parameters) on `{res.task}`; drop "
             f"{res.drop} contiguous layers ({res.params_pruned} parameters left); {res.steps} steps of layer-wise "
             f"distillation ({res.mode}); scores on {sc.tokens} training tokens.", "",
             "| layer | CKA(input, output) | trend (Δ CKA) |", "| ---: | ---: | ---: |"]
    lines += [f"| {i} | {c:.4f} | {sc.trend[i]:+.4f} |" if i < len(sc.trend) else f"| {i} | {c:.4f} | — |"
              for i, c in enumerate(sc.cka)]
    lines += ["", "| span | CKA(h_a, h_a+K) | probe R² | score |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {s['start']}..{s['start'] + res.drop - 1} | {s['span_cka']:.4f} | {s['probe_r2']:.4f} | {s['score']:.4f} |"
              for s in sc.spans]
    lines += ["", f"Test perplexity: full model {res.teacher_ppl:.3f}.", "",
              "| dropped span | chosen by | perplexity dropped | after distillation |", "| --- | --- | ---: | ---: |"]
    for r in res.runs:
        after = f"{r.ppl_distilled:.3f}" if r.ppl_distilled is not None else "—"
        lines.append(f"| {r.start}..{r.start + res.drop - 1} | {r.name} | {r.ppl_dropped:.3f} | {after} |")
    return "\n".join(lines) + "\n"


def plot(res: PPCLResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = res.scores
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(range(len(sc.cka)), sc.cka, "o-", label="CKA(input, output) per layer")
    a1.plot([i + 0.5 for i in range(len(sc.trend))], sc.trend, "s--", label="trend (first-order difference)")
    a1.axhline(0, color="grey", lw=0.5)
    a1.set_xlabel("layer")
    a1.legend(fontsize=8)
    starts = [s["start"] for s in sc.spans]
    for key in ("span_cka", "probe_r2", "score"):
        a2.plot(starts, [s[key] for s in sc.spans], "o-", label=key)
    chosen = res.runs[0].start if res.runs else None
    if chosen is not None:
        a2.axvline(chosen, color="red", lw=0.8, label=f"dropped: {chosen}..{chosen + res.drop - 1}")
    a2.set_xlabel(f"span start (span of {res.drop} layers)")
    a2.legend(fontsize=8)
    fig.suptitle(f"PPCL scores ({res.task}, {res.layers} layers)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: PPCLResult, model: nn.Module, data: Any, out: Path, overwrite: bool = False) -> Path:
    """``out``: the pruned model as an HF folder (with the tokenizer) plus ppcl.md, ppcl_layers.csv,
    ppcl.png and ppcl.json, written by ``tool_output`` (lock, partial, rename)."""
    with tool_output(out, MARKER, overwrite) as folder:
        data.save_model(folder, model, None)
        with open(folder / "ppcl_layers.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer", "cka_in_out", "trend", "span_start", "span_cka", "probe_r2", "score"])
            for i in range(max(len(res.scores.cka), len(res.scores.spans))):
                c = res.scores.cka[i] if i < len(res.scores.cka) else ""
                t = res.scores.trend[i] if i < len(res.scores.trend) else ""
                s = res.scores.spans[i] if i < len(res.scores.spans) else {}
                w.writerow([i, c, t, s.get("start", ""), s.get("span_cka", ""), s.get("probe_r2", ""), s.get("score", "")])
        (folder / "ppcl.md").write_text(markdown(res))
        plot(res, folder / "ppcl.png")
        (folder / MARKER).write_text(json.dumps(asdict(res), indent=2, default=lambda v: None if v != v else v))
    return Path(out).expanduser()
