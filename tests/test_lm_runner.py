"""Language-model runs from recipes: tasks, HF models by path or config, tokenizer checks, CE, metrics."""

from __future__ import annotations

import json
import math

import pytest
import yaml
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from distill.cli import app
from distill.core.recipe import load_recipe, recipe_from_dict, shipped_recipes
from distill.core.runner import load_student, run_recipe
from distill.errors import MismatchError, RecipeError
from distill.lm.data import arithmetic as ar
from distill.lm.losses import token_cross_entropy
from distill.lm.models import token_logits
from distill.lm.data.tasks import ArithmeticParams, build_arithmetic
from distill.lm.data.text import tiny_causal_lm

TASK = {"name": "arithmetic", "num_train": 48, "num_val": 8, "num_test": 8, "max_digits": 2, "eval_size": 4}
TINY = {"arch": "llama", "hidden": 16, "layers": 1, "heads": 2}
TRAIN = {"epochs": 1, "batch_size": 16, "lr": 0.01, "progress": False, "trackers": "none"}


def recipe(name: str, **kw) -> dict:
    return {"name": name, "task": TASK, "student": TINY, "method": "sft", "train": TRAIN, **kw}


def test_arithmetic_task_splits_prompts_and_verifier():
    d = build_arithmetic(ArithmeticParams(num_train=50, num_val=10, num_test=10))
    ps = [set(s.references) for s in (d.train, d.val, d.test)]
    assert not (ps[0] & ps[1]) and not (ps[0] & ps[2]) and not (ps[1] & ps[2])  # disjoint problems
    tok = ar.CharTokenizer()
    for prompt, ex, prob in zip(d.test.prompts, d.test.examples, d.test.references):
        assert prompt == [tok.bos_token_id] + tok.encode(prob.prompt)
        assert ex.input_ids[: len(prompt)] == prompt and all(lab == -100 for lab in ex.labels[: len(prompt)])
        completion = ex.input_ids[len(prompt):]
        assert completion[-1] == tok.eos_token_id and len(completion) <= d.max_new_tokens
        assert d.verify(tok.decode(completion), prob)
    batch = d.train.__getitems__([0, 3])
    assert batch["input_ids"].shape == batch["labels"].shape and batch["index"].tolist() == [0, 3]


def test_token_cross_entropy_matches_direct_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    want, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            y = labels[b, i + 1].item()
            if y != -100:
                want -= torch.log_softmax(logits[b, i], -1)[y].item()
                n += 1
    assert token_cross_entropy(logits, labels).item() == pytest.approx(want / n, rel=1e-6)
    assert token_cross_entropy(logits, labels, num_items=10).item() == pytest.approx(want / 10, rel=1e-6)


def test_sft_run_writes_hf_student_and_metrics(tmp_path):
    res = run_recipe(recipe_from_dict(recipe("sft")), out=tmp_path)
    m = res.metrics
    for key in ("test/perplexity", "test/nll", "test/exact_match", "val/exact_match", "time/train_tokens_per_s"):
        assert key in m
    assert m["test/perplexity"] == pytest.approx(math.exp(m["test/nll"]), rel=1e-6)
    student = load_student(res.run_dir)  # HF format: config.json + model.safetensors + tokenizer
    assert type(student).__name__ == "LlamaForCausalLM"
    assert (res.run_dir / "student" / "tokenizer.json").is_file()
    cli = CliRunner().invoke(app, ["eval", str(res.run_dir)])
    assert cli.exit_code == 0, cli.output
    assert "test/exact_match" in cli.output


def _save_model(folder, tok_hf, vocab_size=None, seed=0):
    model = tiny_causal_lm(vocab_size, 16, 1, 2, tok_hf, seed=seed)
    model.save_pretrained(folder)
    tok_hf.save_pretrained(folder)
    return model


def test_hf_models_by_path_and_padded_vocab_rows(tmp_path):
    tok = ar.CharTokenizer().to_hf()
    _save_model(tmp_path / "student", tok)
    teacher = _save_model(tmp_path / "teacher", tok, vocab_size=len(tok) + 9, seed=1)  # padded embedding rows
    r = recipe("hf", student={"arch": "hf", "path": str(tmp_path / "student")}, teacher={"model": str(tmp_path / "teacher")},
               method={"name": "lm_kd", "kind": "forward_kl"})
    res = run_recipe(recipe_from_dict(r), out=tmp_path / "runs")
    assert res.metrics["params/teacher"] > res.metrics["params/student"]
    assert res.metrics["test/token_kl"] > 0
    # the padded rows are cut: logits have exactly the tokenizer's length
    batch = build_arithmetic(ArithmeticParams(**{k: v for k, v in TASK.items() if k != "name"})).test.__getitems__([0])
    assert token_logits(teacher, batch, len(tok)).shape[-1] == len(tok)


def test_hf_config_arch_takes_special_ids_from_tokenizer(tmp_path):
    config = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2}
    res = run_recipe(recipe_from_dict(recipe("cfg", student={"arch": "hf", "config": config})), out=tmp_path)
    model = load_student(res.run_dir)
    tok = ar.CharTokenizer()
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.vocab_size == len(tok)


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    other = ar.CharTokenizer(alphabet="0123456789+-*=#|<\n abc").to_hf()  # different vocabulary
    _save_model(tmp_path / "teacher", other)
    r = recipe("mismatch", teacher={"model": str(tmp_path / "teacher")}, method="lm_kd")
    with pytest.raises(MismatchError, match="tokenizer"):
        run_recipe(recipe_from_dict(r), out=tmp_path / "runs")
    assert not (tmp_path / "runs" / "mismatch").exists()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r))
    cli = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs")])
    assert cli.exit_code == 2 and "tokenizer" in cli.output


def test_model_with_fewer_rows_than_tokens_is_refused(tmp_path):
    tok = ar.CharTokenizer().to_hf()
    model = tiny_causal_lm(len(tok), 16, 1, 2, tok)
    model.resize_token_embeddings(len(tok) - 3)
    model.save_pretrained(tmp_path / "small")  # no tokenizer saved: only the row count can be checked
    with pytest.raises(MismatchError, match="vocabulary rows"):
        run_recipe(recipe_from_dict(recipe("rows", teacher={"model": str(tmp_path / "small")}, method="lm_kd")),
                   out=tmp_path / "runs")


def test_jsonl_task_prompt_completion(tmp_path):
    tok = ar.CharTokenizer().to_hf()
    tok.save_pretrained(tmp_path / "tok")
    problems = ar.generate_problems(40, seed=3)
    with open(tmp_path / "data.jsonl", "w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "completion": p.completion}) + "\n")
    task = {"name": "jsonl", "train": str(tmp_path / "data.jsonl"), "tokenizer": str(tmp_path / "tok"),
            "val_fraction": 0.1, "test_fraction": 0.1, "eval_size": 2, "max_new_tokens": 40}
    res = run_recipe(recipe_from_dict(recipe("jsonl", task=task)), out=tmp_path / "runs")
    assert 0.0 <= res.metrics["test/exact_match"] <= 1.0 and res.metrics["test/perplexity"] > 1


def test_lm_kd_fused_equals_unfused_in_a_run(tmp_path):
    tok = ar.CharTokenizer().to_hf()
    _save_model(tmp_path / "teacher", tok, seed=4)
    base = recipe("kd", teacher={"model": str(tmp_path / "teacher")}, method={"name": "lm_kd", "kind": "jsd", "ce_weight": 0.5})
    a = run_recipe(recipe_from_dict(base), out=tmp_path / "runs")
    fused = {**base, "name": "kdf", "method": {**base["method"], "fused": True, "chunk_size": 7}}
    b = run_recipe(recipe_from_dict(fused), out=tmp_path / "runs")
    for key in ("test/nll", "test/token_kl"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-4)


def test_sft_loss_matches_hf_model_loss():
    """Our CE with the causal shift equals HF's own ``labels=`` loss (same convention)."""
    d = build_arithmetic(ArithmeticParams(num_train=8, num_val=2, num_test=2))
    model = tiny_causal_lm(None, 16, 1, 2, d.tokenizer, seed=0)
    batch = d.train.__getitems__(list(range(8)))
    ours = token_cross_entropy(token_logits(model, batch, len(d.tokenizer)), batch["labels"])
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    direct = F.cross_entropy(token_logits(model, batch, len(d.tokenizer))[:, :-1].reshape(-1, len(d.tokenizer)),
                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert ours.item() == pytest.approx(direct.item(), rel=1e-6)


@pytest.mark.slow
def test_pytext_task_runs(tmp_path):
    r = {"name": "pytext", "task": {"name": "pytext", "block_size": 32, "vocab_size": 300},
         "student": TINY, "method": "sft", "train": {**TRAIN, "max_steps": 3}}
    res = run_recipe(recipe_from_dict(r), out=tmp_path)
    assert res.metrics["test/perplexity"] < 300 * 1.5 and "test/exact_match" not in res.metrics


LM_SHORT = {
    "arithmetic": ["task.num_train=64", "task.num_val=8", "task.num_test=8", "task.eval_size=4"],
    "pytext": ["task.block_size=32", "task.vocab_size=300"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in shipped_recipes() if n.startswith(("arithmetic-", "pytext-"))])
def test_every_shipped_lm_recipe_runs_shortened(name, tmp_path):
    """Each shipped LM recipe end to end with its own method and models, shortened to two steps."""
    r = load_recipe(name)
    sets = LM_SHORT[r.task.name] + ["train.max_steps=2", "train.progress=false", "train.trackers=none"]
    r = load_recipe(name, sets)
    if r.teacher is not None and r.teacher.recipe is not None:
        (tmp_path / "t.yaml").write_text(yaml.safe_dump(load_recipe(r.teacher.recipe, sets).resolved()))
        r = r.model_copy(update={"teacher": r.teacher.model_copy(update={"recipe": str(tmp_path / "t.yaml")})})
    res = run_recipe(r, out=tmp_path / "runs")
    assert res.metrics["test/perplexity"] > 1.0
    assert ("test/exact_match" in res.metrics) == (r.task.name == "arithmetic")


def test_records_from_a_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    from distill.lm.data.text import load_records

    rows = {"prompt": ["1+1\n", "2+3\n"], "completion": ["#2", "#5"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    recs = load_records(tmp_path / "ds")
    assert [(r.prompt, r.completion) for r in recs] == list(zip(rows["prompt"], rows["completion"]))
    datasets.Dataset.from_dict({"x": ["a"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(RecipeError, match="columns"):
        load_records(tmp_path / "bad")


def test_arch_of_the_wrong_family_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="language model"):
        run_recipe(recipe_from_dict({"name": "x", "task": "mnist1d", "student": TINY, "method": "ce",
                                     "train": TRAIN}), out=tmp_path)
    with pytest.raises(RecipeError, match="not a language model"):
        run_recipe(recipe_from_dict(recipe("y", student={"arch": "mlp"})), out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_token_and_sequence_logprobs_match_a_direct_loop():
    from distill.lm.losses import sequence_logprob, token_logprobs

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, dtype=torch.float64)
    labels = torch.tensor([[-100, 2, 3, -100, -100], [-100, -100, 5, 0, 1]])
    lp, mask = token_logprobs(logits, labels, temperature=2.0)
    for b in range(2):
        total, n = 0.0, 0
        for i in range(4):
            y = labels[b, i + 1].item()
            want = torch.log_softmax(logits[b, i] / 2.0, -1)[y].item() if y != -100 else 0.0
            assert lp[b, i].item() == pytest.approx(want, abs=1e-6) and bool(mask[b, i]) == (y != -100)
            total, n = total + want, n + (y != -100)
        assert sequence_logprob(logits, labels, temperature=2.0)[b].item() == pytest.approx(total, abs=1e-6)
        assert sequence_logprob(logits, labels, True, 2.0)[b].item() == pytest.approx(total / n, abs=1e-6)


def test_init_starts_the_student_from_a_trained_run(tmp_path):
    base = recipe("base")
    first = run_recipe(recipe_from_dict(base), out=tmp_path)
    r = {k: v for k, v in recipe("cont", init={"recipe": base}, train={**TRAIN, "lr": 1e-12}).items() if k != "student"}
    res = run_recipe(recipe_from_dict(r), out=tmp_path)  # a vanishing learning rate: the same model
    assert res.metrics["test/nll"] == pytest.approx(first.metrics["test/nll"], rel=1e-6)
    assert (tmp_path / "_teachers").is_dir()  # the init recipe was trained once, cached like teachers
    with pytest.raises(RecipeError, match="not both"):
        recipe_from_dict(recipe("both", init={"run": str(first.run_dir)}))
