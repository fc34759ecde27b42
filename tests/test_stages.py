"""Staged recipes (S24 AceReason): stage recipes, validation before training, chaining, layout, atomic
failure, resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.core.stages import stage_recipe, stage_recipes
from distill.core.trainer import Trainer
from distill.errors import Interrupted, RecipeError

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TASK = {"name": "arithmetic", "num_train": 32, "num_val": 8, "num_test": 8, "max_digits": 2, "eval_size": 4}
STUDENT = {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}
TRAIN = {"epochs": 1, "batch_size": 8, "lr": 0.01, "schedule": "constant", "progress": False, "trackers": "none",
         "log_every": 1}


def staged(long_lr: float | None = None, **kw) -> dict:
    long = {"name": "long", "train": {"max_steps": 2}}
    if long_lr is not None:
        long["train"]["lr"] = long_lr
    return {"name": "staged", "task": dict(TASK), "student": STUDENT, "method": "sft", "train": dict(TRAIN),
            "stages": [{"name": "short", "set": ["task.max_digits=1"], "train": {"max_steps": 2}}, long], **kw}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "student" / "model.safetensors"))


@pytest.fixture
def fits(monkeypatch):
    """Trainer.fit, counted; ``fits.fail_on`` (1-based call) raises before training, ``fits.stop`` maps a
    run-folder name to a ``stop_at_step``."""
    original = Trainer.fit

    class Fits:
        calls: list[str] = []
        fail_on: int | None = None
        stop: dict[str, int] = {}

    def fit(self, resume=False, stop_at_step=None):
        Fits.calls.append(self.run_dir.name)
        if Fits.fail_on == len(Fits.calls):
            raise RuntimeError("boom")
        return original(self, resume=resume, stop_at_step=Fits.stop.get(self.run_dir.name.removesuffix(".partial"),
                                                                         stop_at_step))

    Fits.calls = []
    monkeypatch.setattr(Trainer, "fit", fit)
    return Fits


def test_stage_recipes_apply_method_train_and_set_in_order():
    d = staged()
    d["stages"].append({"name": "kd", "method": {"name": "lm_kd", "kind": "reverse_kl"},
                        "train": {"max_steps": 3, "lr": 0.5}, "set": ["method.temperature=2", "train.lr=0.25"]})
    d["teacher"] = {"model": "/nonexistent/teacher"}  # only validated here, never loaded
    r = recipe_from_dict(d)
    s0, s1, s2 = stage_recipes(r)
    assert s0.name == "staged-short" and s0.task.params["max_digits"] == 1 and s0.train.max_steps == 2
    assert s0.student is not None and s0.init is None and s0.stages is None  # stage 0: the base's student
    assert s1.task.params["max_digits"] == 2 and s1.student is None and s1.init is not None  # from stage 0
    assert s1.train.lr == 0.01 and s1.train.batch_size == 8  # base train keys kept, the stage's merged in
    assert s2.method.name == "lm_kd" and s2.method.params["kind"] == "reverse_kl"
    assert s2.method.params["temperature"] == 2 and s2.train.lr == 0.25 and s2.train.max_steps == 3  # set last
    assert stage_recipe(r, 2, "/runs/x/1-long").init.run == "/runs/x/1-long"
    assert "stages" not in recipe_from_dict(staged() | {"stages": None}).resolved()  # unstaged dumps unchanged


@pytest.mark.parametrize("bad, match", [
    ({"set": ["task.max_digitz=3"]}, r"stages\[1\] 'long'.*task\.max_digitz.*did you mean 'max_digits'"),
    ({"train": {"lr": -1}}, r"stages\[1\] 'long'.*train\.lr"),
    ({"method": "no_such_method"}, r"stages\[1\] 'long'.*unknown method"),
    ({"set": ["student.hidden=32"]}, r"stages\[1\] 'long'.*student"),  # stage i > 0 starts from stage i - 1
])
def test_a_bad_later_stage_fails_when_the_recipe_loads(bad, match):
    d = staged()
    d["stages"][1].update(bad)
    with pytest.raises(RecipeError, match=match):
        recipe_from_dict(d)


def test_stages_need_distinct_names_and_known_keys():
    d = staged()
    d["stages"][1]["name"] = "short"
    with pytest.raises(RecipeError, match="distinct names"):
        recipe_from_dict(d)
    d = staged()
    d["stages"][0]["sett"] = []
    with pytest.raises(RecipeError, match="unknown key"):
        recipe_from_dict(d)


def test_run_validates_every_stage_before_training(tmp_path, fits):
    r = recipe_from_dict(staged())
    r.stages[1].set.append("task.max_digitz=3")  # bypassing recipe_from_dict's check
    with pytest.raises(RecipeError, match=r"stages\[1\]"):
        run_recipe(r, out=tmp_path)
    assert fits.calls == [] and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_stage_two_starts_from_stage_one_and_the_folder_holds_every_stage(tmp_path, fits):
    # stage 2 trains with lr 1e-30: a no-op, so its student equals stage 1's iff it started from it
    res = run_recipe(recipe_from_dict(staged(long_lr=1e-30)), out=tmp_path)
    final = tmp_path / "staged"
    assert res.run_dir == final and not (tmp_path / "staged.partial").exists()
    short, long = final / "stages" / "0-short", final / "stages" / "1-long"
    w1, w2, wf = weights(short), weights(long), weights(final)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-20)
        torch.testing.assert_close(wf[k], w2[k], rtol=0, atol=0)  # the final student is the last stage's
    assert yaml.safe_load((long / "recipe.yaml").read_text())["init"]["run"] == str(short.resolve())  # relocated
    assert yaml.safe_load((short / "recipe.yaml").read_text())["task"]["params"]["max_digits"] == 1
    assert yaml.safe_load((final / "recipe.yaml").read_text())["stages"][0]["name"] == "short"

    m = res.metrics
    assert m["test/perplexity"] == m["stage/long/test/perplexity"]
    assert "stage/short/test/perplexity" in m and "stage/short/val/exact_match" in m
    assert m["time/train_s"] == pytest.approx(m["stage/short/time/train_s"] + m["stage/long/time/train_s"])
    h = res.history
    assert [r["stage"] for r in h if "train/loss" in r] == [0, 0, 1, 1]
    assert [r["step"] for r in h if "train/loss" in r] == [1, 2, 3, 4]  # steps count on across stages
    assert [r["train/lr"] for r in h if "train/loss" in r] == [0.01, 0.01, 1e-30, 1e-30]

    fits.calls.clear()
    again = run_recipe(recipe_from_dict(staged(long_lr=1e-30)), out=tmp_path)  # same recipe: reused whole
    assert fits.calls == [] and again.metrics == pytest.approx(res.metrics)
    assert [r["stage"] for r in again.history] == [r["stage"] for r in h]


def test_a_failed_stage_leaves_no_run_folder_and_resume_reuses_finished_stages(tmp_path, fits):
    fits.fail_on = 1  # the first stage fails before a checkpoint: nothing to resume, nothing left
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(recipe_from_dict(staged()), out=tmp_path)
    assert not any(tmp_path.iterdir())

    fits.calls.clear()
    fits.fail_on = 2  # the second stage fails: no final folder; the partial keeps the finished stage
    with pytest.raises(RuntimeError, match="boom"):
        run_recipe(recipe_from_dict(staged()), out=tmp_path)
    assert not (tmp_path / "staged").exists()
    short = tmp_path / "staged.partial" / "stages" / "0-short"
    assert (short / "metrics.json").is_file()
    before = weights(short)
    mtime = (short / "student" / "model.safetensors").stat().st_mtime_ns

    fits.calls.clear()
    fits.fail_on = None
    res = run_recipe(recipe_from_dict(staged()), out=tmp_path, resume=True)
    assert fits.calls == ["1-long.partial"]  # stage 1 reused, only stage 2 trained
    assert (res.run_dir / "stages" / "0-short" / "student" / "model.safetensors").stat().st_mtime_ns == mtime
    after = weights(res.run_dir / "stages" / "0-short")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_an_interrupted_stage_resumes_exactly(tmp_path, fits):
    straight = run_recipe(recipe_from_dict(staged()), out=tmp_path / "a")
    fits.stop = {"1-long": 1}
    with pytest.raises(Interrupted):
        run_recipe(recipe_from_dict(staged()), out=tmp_path / "b")
    assert not (tmp_path / "b" / "staged").exists()
    fits.stop = {}
    fits.calls.clear()
    resumed = run_recipe(recipe_from_dict(staged()), out=tmp_path / "b", resume=True)
    assert fits.calls == ["1-long.partial"]
    wa, wb = weights(straight.run_dir), weights(resumed.run_dir)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert straight.metrics["test/perplexity"] == resumed.metrics["test/perplexity"]
