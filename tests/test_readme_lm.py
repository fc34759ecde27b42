"""The README's language-model quick start runs as written: its recipe and its three commands, on tiny
HF models of the kinds a user brings (a GPT-2 teacher, a Qwen2 student, 128 positions each) and a
JSONL file of their own."""

from __future__ import annotations

import json
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def readme_lm_quick_start() -> tuple[str, list[str]]:
    """The recipe (YAML block) and the commands (bash block) under 'Quick start with your own teacher'."""
    text = README.read_text()
    section = text[text.index("### Quick start with your own teacher and student"):]
    yaml_block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    bash_block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in bash_block.splitlines() if line.strip()]
    return yaml_block, [c for c in commands if c]


def make_models_and_data(root: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from distill.lm.data.pytext import train_bpe

    rng = random.Random(0)
    problems = [(rng.randrange(100), rng.randrange(100)) for _ in range(120)]
    tok = train_bpe([f"{a}+{b}={a + b}" for a, b in problems] * 2, vocab_size=300)  # a BPE of the user's own
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids))
    student = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), max_position_embeddings=128, hidden_size=16,
                                           intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, **ids))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / "models" / name, safe_serialization=True)
        tok.save_pretrained(root / "models" / name)
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w") as f:
        for a, b in problems:
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")


@pytest.mark.slow
def test_readme_lm_quick_start_runs_as_written(tmp_path):
    recipe, commands = readme_lm_quick_start()
    assert len(commands) == 3 and all(c.startswith("distill ") for c in commands)
    make_models_and_data(tmp_path)
    (tmp_path / "my-lm-kd.yaml").write_text(recipe)
    for command in commands:
        p = subprocess.run([sys.executable, "-m", "distill.cli", *shlex.split(command)[1:]], cwd=tmp_path,
                           capture_output=True, text=True)
        assert p.returncode == 0, f"{command}\n{p.stderr[-3000:]}"
    for run in ("my-lm-kd", "from-cache"):
        metrics = json.loads((tmp_path / "runs" / run / "metrics.json").read_text())
        assert metrics["test/perplexity"] > 0 and "test/exact_match" in metrics
    assert (tmp_path / "cache" / "teacher" / "manifest.json").is_file()


def test_lengths_beyond_a_models_context_are_refused_before_training(tmp_path):
    make_models_and_data(tmp_path)
    recipe, _ = readme_lm_quick_start()
    (tmp_path / "r.yaml").write_text(recipe)

    def run(*sets: str) -> subprocess.CompletedProcess:
        args = [a for s in sets for a in ("--set", s)]
        return subprocess.run([sys.executable, "-m", "distill.cli", "run", "r.yaml", *args], cwd=tmp_path,
                              capture_output=True, text=True)

    p = run("task.max_new_tokens=200")
    assert p.returncode == 2 and "has 128 positions" in p.stderr and "set task.max_new_tokens <=" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    long = tmp_path / "data" / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "1+1=", "completion": "2" * 300}) + "\n" for _ in range(40)))
    p = run("task.train=data/long.jsonl", "task.max_new_tokens=8")
    assert p.returncode == 2 and "set task.max_length <= 128" in p.stderr, p.stderr
    assert not (tmp_path / "runs" / "my-lm-kd").exists() and not (tmp_path / "runs" / "my-lm-kd.partial").exists()
