"""S33 BAI weighted merging (``distill.lm.merge``): state-dict merges against direct arithmetic, the
two-stage rule, every mismatch refused, HF folders, the ``distill merge`` command and ``init: {merge}``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from distill.cli import app
from distill.core.recipe import recipe_from_dict
from distill.core.runner import run_recipe
from distill.errors import MismatchError, RecipeError, RunExistsError
from distill.lm.data import arithmetic as ar
from distill.lm.merge import merge_models, merge_state_dicts, two_stage_merge
from distill.lm.models import load_causal_lm
from distill.lm.data.text import tiny_causal_lm

TASK = {"name": "arithmetic", "num_train": 32, "num_val": 8, "num_test": 8, "max_digits": 2, "eval_size": 4}
TRAIN = {"epochs": 1, "max_steps": 2, "batch_size": 16, "lr": 0.01, "progress": False, "trackers": "none"}


@pytest.fixture(scope="module")
def tok():
    return ar.CharTokenizer().to_hf()


def _state(seed: int, tok) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_causal_lm(None, 16, 1, 2, tok, seed=seed).state_dict().items()}


def _save(folder, tok, seed: int, hidden: int = 16):
    model = tiny_causal_lm(None, hidden, 1, 2, tok, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------- state dicts


def test_merge_of_identical_checkpoints_is_exactly_the_identity(tok):
    a = _state(0, tok)
    for weights in ([0.3, 0.7], [1.0, 2.0, 3.0], [0.1, 0.0, 0.9]):
        merged = merge_state_dicts([a] * len(weights), weights)
        assert merged.keys() == a.keys()
        for k in a:
            assert torch.equal(merged[k], a[k]) and merged[k].dtype == a[k].dtype, k
    half = {k: v.to(torch.bfloat16) for k, v in a.items()}  # low precision: float32 accumulation, cast back
    for k, v in merge_state_dicts([half, half], [0.3, 0.7]).items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, half[k])


def test_weights_give_the_weighted_average_of_each_tensor(tok):
    a, b = _state(0, tok), _state(1, tok)
    merged = merge_state_dicts([a, b], [0.3, 0.7])
    for k in a:
        want = 0.3 * a[k].double() + 0.7 * b[k].double()
        torch.testing.assert_close(merged[k].double(), want, rtol=1e-6, atol=1e-7, msg=k)
    same = merge_state_dicts([a, b], [3, 7])  # weights are normalised
    assert all(torch.equal(same[k], merged[k]) for k in a)
    c = _state(2, tok)
    three = merge_state_dicts([a, b, c], [0.2, 0.3, 0.5])
    for k in a:
        want = 0.2 * a[k].double() + 0.3 * b[k].double() + 0.5 * c[k].double()
        torch.testing.assert_close(three[k].double(), want, rtol=1e-6, atol=1e-7, msg=k)


def test_two_stage_rule_against_direct_computation(tok):
    inst, reason, base = _state(0, tok), _state(1, tok), _state(2, tok)
    merged = two_stage_merge([inst, reason], [0.4, 0.6], base, base_weight=0.25)
    for k in inst:
        stage1 = 0.4 * inst[k].double() + 0.6 * reason[k].double()
        want = 0.75 * stage1 + 0.25 * base[k].double()
        torch.testing.assert_close(merged[k].double(), want, rtol=1e-6, atol=1e-7, msg=k)
    only_stage1 = two_stage_merge([inst, reason], [0.4, 0.6], base, base_weight=0.0)
    assert all(torch.equal(only_stage1[k], v) for k, v in merge_state_dicts([inst, reason], [0.4, 0.6]).items())
    with pytest.raises(RecipeError, match="base_weight"):
        two_stage_merge([inst], [1.0], base, base_weight=1.5)


def test_mismatches_and_bad_weights_are_refused(tok):
    a, b = _state(0, tok), _state(1, tok)
    missing = dict(b)
    missing.pop("lm_head.weight")
    with pytest.raises(MismatchError, match="missing"):
        merge_state_dicts([a, missing], [0.5, 0.5])
    extra = {**b, "extra.weight": torch.zeros(2)}
    with pytest.raises(MismatchError, match="extra"):
        merge_state_dicts([a, extra], [0.5, 0.5])
    bigger = {k: v.clone() for k, v in tiny_causal_lm(None, 32, 1, 2, tok, seed=0).state_dict().items()}
    with pytest.raises(MismatchError, match="shape|is \\["):
        merge_state_dicts([a, bigger], [0.5, 0.5])
    ints = {"w": torch.ones(3), "ids": torch.arange(3)}
    assert torch.equal(merge_state_dicts([ints, ints], [0.5, 0.5])["ids"], torch.arange(3))  # equal buffers: copied
    with pytest.raises(MismatchError, match="non-float"):
        merge_state_dicts([ints, {"w": torch.ones(3), "ids": torch.arange(3) + 1}], [0.5, 0.5])
    for weights, match in (([0.5], "1 weights for 2"), ([-0.1, 1.1], ">= 0"), ([0.0, 0.0], "sum to 0"),
                           ([float("nan"), 1.0], "finite")):
        with pytest.raises(RecipeError, match=match):
            merge_state_dicts([a, b], weights)


# ------------------------------------------------------------------------------------- model folders


def test_merge_models_writes_an_hf_folder_with_the_first_tokenizer(tmp_path, tok):
    sa, sb, sbase = (_save(tmp_path / n, tok, seed) for n, seed in (("a", 0), ("b", 1), ("base", 2)))
    # a run folder works as an input too (its student/)
    (tmp_path / "run").mkdir()
    (tmp_path / "b").rename(tmp_path / "run" / "student")
    out = merge_models([tmp_path / "a", tmp_path / "run"], [0.3, 0.7], tmp_path / "m",
                       base=tmp_path / "base", base_weight=0.2)
    merged = load_causal_lm(out).state_dict()
    for k in sa:
        want = 0.8 * (0.3 * sa[k].double() + 0.7 * sb[k].double()) + 0.2 * sbase[k].double()
        torch.testing.assert_close(merged[k].double(), want, rtol=1e-6, atol=1e-7, msg=k)
    assert (out / "tokenizer.json").is_file() and not (tmp_path / "m.partial").exists()
    record = json.loads((out / "merge.json").read_text())
    assert record["weights"] == [0.3, 0.7] and record["base_weight"] == 0.2
    with pytest.raises(RunExistsError):
        merge_models([tmp_path / "a"], [1.0], out)
    _save(tmp_path / "wide", tok, 3, hidden=32)
    with pytest.raises(MismatchError):
        merge_models([tmp_path / "a", tmp_path / "wide"], [0.5, 0.5], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_cli_merge(tmp_path, tok):
    sa, sb = _save(tmp_path / "a", tok, 0), _save(tmp_path / "b", tok, 1)
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.3,0.7",
                              "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    for k in sa:
        torch.testing.assert_close(merged[k].double(), 0.3 * sa[k].double() + 0.7 * sb[k].double(),
                                   rtol=1e-6, atol=1e-7)
    same = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.3",
                               "--weights", "0.7", "--out", str(tmp_path / "m2")])  # repeated form
    assert same.exit_code == 0, same.output
    assert load_file(str(tmp_path / "m2" / "model.safetensors")).keys() == merged.keys()
    for args, message in (
        (["--weights", "0.3,x"], "expected numbers"),
        (["--weights", "1"], "1 weights for 2"),
        (["--stage-two", str(tmp_path / "a")], "--base-weight"),
        (["--stage-two", str(tmp_path / "a"), "--base-weight", "2"], "base_weight"),
    ):
        bad = runner.invoke(app, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "x"),
                                  *args])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------- recipes


def test_run_initialised_from_a_two_stage_merge(tmp_path, tok):
    sa, sb = _save(tmp_path / "a", tok, 0), _save(tmp_path / "b", tok, 1)
    base_recipe = {"name": "base", "task": TASK, "student": {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2},
                   "method": "sft", "train": TRAIN}
    merge = {"models": [{"model": "a"}, {"model": "b"}], "weights": [1, 3], "base": {"recipe": base_recipe},
             "base_weight": 0.5}
    r = {"name": "from-merge", "task": TASK, "init": {"merge": merge}, "method": "sft", "train": TRAIN}
    res = run_recipe(recipe_from_dict(r, base_dir=tmp_path), out=tmp_path / "runs")
    cached = list((tmp_path / "runs" / "_teachers").glob("merge-*"))
    assert len(cached) == 1 and (cached[0] / "merge.json").is_file()
    base_state = load_causal_lm(tmp_path / "runs" / "_teachers" / next(
        p.name for p in (tmp_path / "runs" / "_teachers").iterdir() if p.name.startswith("base-"))).state_dict()
    merged = load_causal_lm(cached[0]).state_dict()
    for k in sa:  # stage 1 with weights 1:3 -> 0.25, 0.75; stage 2 half and half with the trained base
        want = 0.5 * (0.25 * sa[k].double() + 0.75 * sb[k].double()) + 0.5 * base_state[k].double()
        torch.testing.assert_close(merged[k].double(), want, rtol=1e-6, atol=1e-7, msg=k)
    assert "test/exact_match" in res.metrics
    saved = yaml.safe_load((res.run_dir / "recipe.yaml").read_text())["init"]["merge"]
    assert saved["models"][0]["model"] == str((tmp_path / "a").resolve())  # self-contained: absolute paths
    assert saved["base"]["recipe"]["name"] == "base"  # and the base's recipe inlined
    stamp = (cached[0] / "merge.json").stat().st_mtime_ns
    run_recipe(recipe_from_dict({**r, "name": "again"}, base_dir=tmp_path), out=tmp_path / "runs")
    assert (cached[0] / "merge.json").stat().st_mtime_ns == stamp  # merged once, reused
