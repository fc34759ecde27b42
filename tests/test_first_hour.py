"""What a new user hits in the first hour (issue 11): interrupted teachers resume, tokenizers that split
text differently are refused, a teacher cache refreshes across evaluation-only settings, stale runs are
not returned as new, and one rule for paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe, tiny_teacher

from distill.core import checkpoint as ckpt
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.errors import Interrupted, MismatchError, RunExistsError


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd, capture_output=True, text=True)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# --- Ctrl-C work is kept -------------------------------------------------------------------------

def test_an_interrupted_teacher_resumes_with_the_students_resume(tmp_path):
    teacher = tiny_teacher() | {"train": {**tiny_teacher()["train"], "eval_every": 2}}
    data = tiny_recipe("kd", {"name": "kd"}, {"recipe": teacher}, epochs=1)
    straight = run_recipe(recipe_from_dict(data), out=tmp_path / "a")

    runs = tmp_path / "b"
    t = recipe_from_dict(teacher)
    with pytest.raises(Interrupted):  # Ctrl-C while the teacher trains (the student's run has not started)
        run_recipe(t, out=runs / "_teachers", name=f"{t.name}-{t.fingerprint()}", stop_at_step=5)
    partial = runs / "_teachers" / f"{t.name}-{t.fingerprint()}.partial"
    step = json.loads((ckpt.find(partial / "checkpoints") / "state.json").read_text())["trainer"]["step"]
    assert step == 5
    with pytest.raises(RunExistsError, match="--resume"):  # the same command again: the work is not dropped
        run_recipe(recipe_from_dict(data), out=runs)
    assert ckpt.exists(partial / "checkpoints")
    resumed = run_recipe(recipe_from_dict(data), out=runs, resume=True)
    history = (runs / "_teachers" / f"{t.name}-{t.fingerprint()}" / "history.csv").read_text()
    assert history == (tmp_path / "a" / "_teachers" / f"{t.name}-{t.fingerprint()}" / "history.csv").read_text()
    assert resumed.metrics["test/accuracy"] == straight.metrics["test/accuracy"]


# --- tokenizers ----------------------------------------------------------------------------------

def test_a_tokenizer_with_the_same_vocabulary_but_other_rules_is_refused(tmp_path):
    from tokenizers import normalizers

    from distill.lm.data.arithmetic import CharTokenizer
    from distill.lm.models import check_same_tokenizer

    a, b = CharTokenizer().to_hf(), CharTokenizer().to_hf()
    check_same_tokenizer(a, b)
    b.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, text split differently
    assert a.get_vocab() == b.get_vocab()
    with pytest.raises(MismatchError, match="normalizer"):
        check_same_tokenizer(b, a, "student")


# --- teacher cache: evaluation-only settings, --overwrite ---------------------------------------

@pytest.mark.slow
def test_cache_teacher_refreshes_across_max_new_tokens_and_overwrites(tmp_path):
    from test_readme_lm import make_models_and_data

    make_models_and_data(tmp_path)
    write(tmp_path / "r.yaml", {"name": "r", "task": {"name": "jsonl", "train": "data/train.jsonl",
                                                      "tokenizer": "models/teacher"},
                                "student": {"arch": "hf", "path": "models/student"},
                                "teacher": {"model": "models/teacher"}, "method": "lm_kd"})
    p = cli("cache-teacher", "r.yaml", "--top-k", "8", "--out", "cache", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    p = cli("cache-teacher", "r.yaml", "--top-k", "8", "--out", "cache", "--set", "task.max_new_tokens=5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr  # an evaluation-only setting: the same cache
    p = cli("cache-teacher", "r.yaml", "--top-k", "4", "--out", "cache", cwd=tmp_path)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    p = cli("cache-teacher", "r.yaml", "--top-k", "4", "--out", "cache", "--overwrite", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["k"] == 4
    assert (tmp_path / "cache" / "notes.txt").read_text() == "mine"  # only the cache's own files replaced


# --- stale runs ----------------------------------------------------------------------------------

def test_a_finished_run_is_reused_only_for_the_same_recipe_and_says_so(tmp_path):
    write(tmp_path / "ce.yaml", tiny_recipe("ce", {"name": "ce"}, epochs=1))
    assert cli("run", "ce.yaml", "--out", "runs", cwd=tmp_path).returncode == 0
    p = cli("run", "ce.yaml", "--out", "runs", cwd=tmp_path)
    assert p.returncode == 0 and "reusing it" in p.stderr
    p = cli("run", "ce.yaml", "--out", "runs", "--set", "student.width=8", cwd=tmp_path)
    assert p.returncode == 2 and "student.params.width: 4 -> 8" in p.stderr


# --- distill.distill with HF language models ------------------------------------------------------

def _hf_pair(tmp_path):
    from test_readme_lm import make_models_and_data
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_models_and_data(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path / "models" / "teacher")
    load = AutoModelForCausalLM.from_pretrained
    records = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    return load(tmp_path / "models" / "teacher"), load(tmp_path / "models" / "student"), tok, records


def test_distill_accepts_hf_language_models_and_records(tmp_path):
    import distill

    teacher, student, tok, records = _hf_pair(tmp_path)
    res = distill.distill(teacher, student, train=records, tokenizer=tok, method="lm_kd",
                          method_params={"kind": "forward_kl"}, train_config={"epochs": 1, "batch_size": 16,
                                                                              "progress": False, "trackers": "none"},
                          task_params={"eval_size": 4}, out=tmp_path / "runs", name="lm")
    assert res.metrics["test/perplexity"] > 0 and "test/token_kl" in res.metrics
    assert (tmp_path / "runs" / "lm" / "student" / "config.json").is_file()
    with pytest.raises(distill.DistillError, match="pass tokenizer="):
        distill.distill(teacher, student, train=records, method="lm_kd", out=tmp_path / "runs", name="x")
    with pytest.raises(distill.DistillError, match=r"train\[1\]"):
        distill.distill(teacher, student, train=["a", 3], tokenizer=tok, method="sft", out=tmp_path / "runs",
                        name="y")
    assert not (tmp_path / "runs" / "x").exists() and not (tmp_path / "runs" / "y").exists()


# --- one rule for paths; stale inputs -------------------------------------------------------------

@pytest.mark.slow
def test_paths_follow_one_rule_and_a_grown_dataset_is_not_reused(tmp_path):
    from test_readme_lm import make_models_and_data

    make_models_and_data(tmp_path / "project")
    project = tmp_path / "project"
    (project / "recipes").mkdir()
    recipe = {"name": "sft", "task": {"name": "jsonl", "train": "../data/train.jsonl",
                                      "tokenizer": "../models/teacher", "eval_size": 4},
              "student": {"arch": "hf", "path": "../models/student"}, "method": "sft",
              "train": {"epochs": 1, "batch_size": 16, "progress": False, "trackers": "none"}}
    write(project / "recipes" / "sft.yaml", recipe)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # in a recipe file: relative to the recipe's folder, wherever the command runs
    p = cli("run", str(project / "recipes" / "sft.yaml"), "--out", "runs", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    saved = yaml.safe_load((elsewhere / "runs" / "sft" / "recipe.yaml").read_text())
    assert saved["task"]["params"]["train"] == str(project / "data" / "train.jsonl")  # absolute in the run folder
    assert saved["student"]["params"]["path"] == str(project / "models" / "student")
    p = cli("eval", str(elsewhere / "runs" / "sft"), cwd=tmp_path)  # from any directory
    assert p.returncode == 0, p.stderr

    # on the command line: relative to the working directory
    p = cli("run", "recipes/sft.yaml", "--out", "runs", "--set", "task.train=data/train.jsonl", cwd=project)
    assert p.returncode == 0, p.stderr

    # the data grow: the finished run is not returned as if new
    with open(project / "data" / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    p = cli("run", str(project / "recipes" / "sft.yaml"), "--out", "runs", cwd=elsewhere)
    assert p.returncode == 2 and "changed since" in p.stderr and "train.jsonl" in p.stderr, p.stderr


def test_set_reaches_into_a_teacher_recipe_file(tmp_path):
    from distill.core.recipe import load_recipe
    from distill.errors import RecipeError

    r = load_recipe("mnist1d-kd", ["teacher.recipe.train.epochs=5"])
    assert r.teacher.recipe["train"]["epochs"] == 5 and r.teacher.recipe["name"] == "mnist1d-teacher"
    with pytest.raises(RecipeError, match="teacher.recipe: recipe key 'method.temperature': unknown key"):
        load_recipe("mnist1d-kd", ["teacher.recipe.method.temperature=3"])
    assert load_recipe("mnist1d-kd", ["train.mixed_precision=no"]).train.mixed_precision == "no"


# --- generation ignores sampling fields stored in the model (issue 12, item 1) --------------------

def test_rollouts_ignore_sampling_settings_stored_in_the_model():
    import torch

    from distill.lm.data.arithmetic import CharTokenizer
    from distill.lm.data.text import tiny_causal_lm
    from distill.lm.rollout import rollout

    tok = CharTokenizer().to_hf()
    clean = tiny_causal_lm(None, 16, 1, 2, tok, seed=0)
    dirty = tiny_causal_lm(None, 16, 1, 2, tok, seed=0)
    for k, v in {"repetition_penalty": 5.0, "min_p": 0.2, "top_k": 20, "temperature": 0.6, "do_sample": True,
                 "no_repeat_ngram_size": 1}.items():
        setattr(dirty.generation_config, k, v)
    prompts = [tok("12+3=")["input_ids"], tok("7*8=")["input_ids"]]
    kw = {"max_new_tokens": 12, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id}
    for greedy in (True, False):
        torch.manual_seed(0)
        a = rollout(clean, prompts, greedy=greedy, temperature=1.0, **kw)
        torch.manual_seed(0)
        b = rollout(dirty, prompts, greedy=greedy, temperature=1.0, **kw)
        assert a.completions == b.completions and a.logprobs == b.logprobs
    assert dirty.generation_config.repetition_penalty == 5.0  # the model's own config is put back
