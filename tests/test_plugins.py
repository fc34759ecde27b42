"""Families are plug-ins: a user's package installed beside distill adds a method and an arch that
``distill list``, recipes and ``distill run`` then use (through the ``distill.plugins`` entry points)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_recipe, tiny_teacher

EXAMPLE = Path(__file__).parents[1] / "examples" / "plugin" / "distill_logit_mse"


def install_plugin(site: Path, entry: str = "distill_logit_mse") -> None:
    """What ``pip install`` leaves: the package and a ``.dist-info`` with its entry point, on ``sys.path``."""
    shutil.copytree(EXAMPLE, site / "distill_logit_mse")
    info = site / "distill_logit_mse-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: distill-logit-mse\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[distill.plugins]\nlogit_mse = {entry}\n")


def cli(*args: str, cwd: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_a_users_plugin_adds_a_method_and_an_arch(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)
    p = cli("list", cwd=tmp_path, site=site)
    assert p.returncode == 0, p.stderr
    assert "logit_mse" in p.stdout and "wide_mlp" in p.stdout and "distill-logit-mse" in p.stdout

    (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(tiny_teacher()))
    recipe = tiny_recipe("mse", {"name": "logit_mse", "ce_weight": 0.5}, {"recipe": "teacher.yaml"})
    recipe["student"] = {"arch": "wide_mlp", "width": 32}
    (tmp_path / "mse.yaml").write_text(yaml.safe_dump(recipe))
    p = cli("run", "mse.yaml", "--out", "runs", cwd=tmp_path, site=site)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "runs" / "mse"
    assert json.loads((run / "student" / "config.json").read_text())["arch"] == "wide_mlp"
    history = (run / "history.csv").read_text().splitlines()
    assert "train/mse" in history[0]  # the plug-in's own loss was trained, not a built-in one
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["method"] == {"name": "logit_mse", "params": {"mse_weight": 1.0, "ce_weight": 0.5}}

    # without the plug-in the same recipe is an unknown method: one line, exit 2
    p = cli("run", "mse.yaml", "--out", "runs2", cwd=tmp_path, site=tmp_path / "nothing")
    assert p.returncode == 2 and "unknown method 'logit_mse'" in p.stderr and len(p.stderr.splitlines()) == 1


def test_a_broken_plugin_is_named(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site, entry="distill_logit_mse.missing")
    p = cli("list", cwd=tmp_path, site=site)
    assert p.returncode == 2, p.stdout
    assert "plug-in 'logit_mse' (distill_logit_mse.missing) failed to load" in p.stderr
