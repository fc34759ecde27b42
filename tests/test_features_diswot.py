"""DisWOT (S59) student ranking: the score against hand computations, rank correlations, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from distill.cli import app
from distill.features.tools import diswot


def _rows_normalised(m: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(m)
    for i in range(m.shape[0]):
        norm = math.sqrt(sum(float(v) ** 2 for v in m[i]))
        out[i] = m[i] / max(norm, 1e-12)
    return out


def _ickd_loops(gs: torch.Tensor, gt: torch.Tensor) -> float:
    """The official ICKD on [classes, C]: per class the C×C outer product, rows normalised."""
    k, c = gs.shape
    total = 0.0
    for n in range(k):
        es = _rows_normalised(torch.outer(gs[n], gs[n]))
        et = _rows_normalised(torch.outer(gt[n], gt[n]))
        total += float(((es - et) ** 2).sum())
    return total / (c * k)


def _sp_loops(fs: torch.Tensor, ft: torch.Tensor) -> float:
    """The official SP: batch Gram, rows normalised, squared distance / b²."""
    b = fs.shape[0]
    gs = _rows_normalised(fs.flatten(1) @ fs.flatten(1).T)
    gt = _rows_normalised(ft.flatten(1) @ ft.flatten(1).T)
    return float(((gt - gs) ** 2).sum()) / (b * b)


def test_ickd_and_class_relation_against_loops() -> None:
    g = torch.Generator().manual_seed(0)
    gs, gt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert float(diswot.ickd_loss(gs, gt)) == pytest.approx(_ickd_loops(gs, gt), rel=1e-5)
    assert float(diswot.ickd_loss(gs, gs)) == 0.0
    wide = torch.randn(3, 7, generator=g)
    assert float(diswot.semantic_similarity(wide, gt, "class")) == pytest.approx(_sp_loops(wide, gt), rel=1e-5)
    with pytest.raises(Exception, match="differ"):
        diswot.ickd_loss(wide, gt)


class _Net(nn.Module):
    def __init__(self, d_in: int, width: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(d_in, width)
        self.head = nn.Linear(width, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _fc_grad(net: _Net, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and the mean-CE gradient of the head weight in closed form: (softmax − onehot)ᵀ f / B."""
    with torch.no_grad():
        f = net.embed(x)
        p = torch.softmax(net.head(f), 1)
        onehot = torch.zeros_like(p)
        onehot[torch.arange(len(y)), y] = 1
        return f, (p - onehot).T @ f / len(y)


@pytest.mark.parametrize("width", [5, 8])
def test_diswot_score_against_hand(width: int) -> None:
    torch.manual_seed(0)
    t, s = _Net(6, 8, 4), _Net(6, width, 4)
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    ft, gt = _fc_grad(t, x, y)
    fs, gs = _fc_grad(s, x, y)
    sem = _ickd_loops(gs, gt) if width == 8 else _sp_loops(gs, gt)
    want = -_sp_loops(fs, ft) - sem
    got = diswot.diswot_score(t, s, x, y, "ickd" if width == 8 else "class")
    assert got.score == pytest.approx(want, rel=1e-4)
    assert got.relation == pytest.approx(_sp_loops(fs, ft), rel=1e-4)
    assert got.semantic > 0.01  # the gradient term is not negligible here
    # a second batch: the gradients of the first must not accumulate into it
    x2, y2 = torch.randn(10, 6), torch.randint(0, 4, (10,))
    (ft2, gt2), (fs2, gs2) = _fc_grad(t, x2, y2), _fc_grad(s, x2, y2)
    sem2 = _ickd_loops(gs2, gt2) if width == 8 else _sp_loops(gs2, gt2)
    again = diswot.diswot_score(t, s, x2, y2, "ickd" if width == 8 else "class")
    assert again.score == pytest.approx(-_sp_loops(fs2, ft2) - sem2, rel=1e-4)


def test_rank_correlations_by_hand_and_scipy() -> None:
    assert diswot.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert diswot.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert diswot.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert diswot.rank([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.3, 0.1, 0.3, 0.9, 0.5, 0.2], [1, 2, 2, 5, 3, 0]
    assert diswot.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
    assert diswot.kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b)[0])


def test_gaussian_init_is_the_official_one() -> None:
    from distill.features.models import ConvNetParams, convnet

    torch.manual_seed(0)
    m = diswot.gaussian_init_(convnet(ConvNetParams(width=32, depth=2), (8, 8), 10))
    conv = m.stages[1][0]
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.05)
    assert m.head.weight.std().item() == pytest.approx(1.0, abs=0.2)
    assert torch.all(m.head.bias == 0) and torch.all(m.stages[0][2].weight == 1) and torch.all(m.stages[0][2].bias == 0)


def test_score_candidates_ranks_and_picks_the_measure() -> None:
    from distill.features.models import ConvNetParams, convnet
    from distill.tasks.models import build_model

    build = lambda spec: build_model(spec["name"], spec["params"], (8, 8), 10)  # noqa: E731
    x, y = torch.randn(16, 8, 8), torch.randint(0, 10, (16,))
    same = [{"arch": "convnet", "width": 8, "depth": d} for d in (1, 2, 3)]
    teacher = convnet(ConvNetParams(width=8, depth=1, growth=1.0), (8, 8), 10)
    rows, used = diswot.score_candidates(teacher, build, [dict(c, growth=1.0) for c in same], x, y, seed=0)
    assert used == "ickd"
    assert sorted(r.rank for r in rows) == [1, 2, 3]
    best = max(rows, key=lambda r: r.score)
    assert best.rank == 1
    mixed = [{"arch": "convnet", "width": 8, "depth": 2}, {"arch": "mlpnet", "width": 16, "depth": 1}]
    rows, used = diswot.score_candidates(teacher, build, mixed, x, y, seed=0)
    assert used == "class" and rows[1].label == "mlpnet-w16-d1"


def test_search_student_cli(tmp_path) -> None:
    cands = tmp_path / "c.yaml"
    cands.write_text("- {arch: convnet, width: 4, depth: 1}\n- {arch: mlpnet, width: 16, depth: 1}\n"
                     "- {arch: vit, hidden: 8, depth: 1, heads: 2, label: tiny-vit}\n")
    runner = CliRunner()
    args = ["search-student", "digits-teacher", "--candidates", str(cands), "--batch-size", "32",
            "--out", str(tmp_path / "out")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "tiny-vit" in r.output
    rep = json.loads((tmp_path / "out" / "diswot.json").read_text())
    assert rep["semantic"] == "class" and len(rep["rows"]) == 3 and rep["batch_size"] == 32
    assert (tmp_path / "out" / "diswot.csv").read_text().count("\n") == 4
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    r = runner.invoke(app, [*args[:-1], str(mine), "--overwrite"])
    assert r.exit_code == 2 and "not written by this command" in r.output
    r = runner.invoke(app, ["search-student", "digits-teacher", "--candidates", str(tmp_path / "nope.yaml"),
                            "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "no such file" in r.output
    r = runner.invoke(app, ["search-student", "pytext-teacher", "--out", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "DisWOT ranks classifiers" in r.output


@pytest.mark.slow
def test_search_student_trains_and_correlates(tmp_path) -> None:
    from distill.core.recipe import load_recipe
    from distill.core.runner import run_recipe

    teacher = run_recipe(load_recipe("digits-teacher", ["train.epochs=3", "train.progress=false"]), out=tmp_path / "t")
    cands = tmp_path / "c.yaml"
    cands.write_text("- {arch: convnet, width: 2, depth: 1}\n- {arch: mlpnet, width: 32, depth: 1}\n"
                     "- {arch: convnet, width: 8, depth: 2}\n")
    r = CliRunner().invoke(app, ["search-student", str(teacher.run_dir), "--candidates", str(cands), "--train",
                                 "--runs", str(tmp_path / "runs"), "--set", "train.epochs=2",
                                 "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "out" / "diswot.json").read_text())
    assert all(0 <= row["accuracy"] <= 1 for row in rep["rows"])
    assert set(rep["correlations"]) >= {"diswot", "parameters"}
    assert (tmp_path / "out" / "diswot.png").is_file()
    assert (tmp_path / "runs" / "diswot-mlpnet-w32-d1" / "metrics.json").is_file()


def test_tool_output_leaves_what_it_did_not_write(tmp_path):
    """A tool's output folder: a leftover ``.partial`` of another command is not removed; its own is;
    an existing folder without the marker is never replaced; a failure leaves nothing."""
    from distill.core.rundir import tool_output
    from distill.errors import RunExistsError

    out = tmp_path / "res"
    foreign = tmp_path / "res.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("a user's file")
    with pytest.raises(RunExistsError, match="not started by this command"):
        with tool_output(out, "m.json", overwrite=True):
            pass
    assert (foreign / "keep.txt").read_text() == "a user's file"
    (foreign / "keep.txt").unlink()
    foreign.rmdir()
    with pytest.raises(ValueError):
        with tool_output(out, "m.json", overwrite=False) as folder:
            (folder / "half.txt").write_text("x")
            raise ValueError("boom")
    assert not out.exists() and not foreign.exists()
    with tool_output(out, "m.json", overwrite=False) as folder:
        (folder / "m.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["m.json"]
    (tmp_path / "mine").mkdir()
    with pytest.raises(RunExistsError, match="not written by this command"):
        with tool_output(tmp_path / "mine", "m.json", overwrite=True):
            pass
