"""`distill --version`, `distill show`, `distill papers`, the paper table (distill.papers) and the docs that
docstrings cite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import distill
from distill import papers as P
from distill.cli import app
from distill.core.recipe import shipped_recipe
from distill.core.registry import METHODS

ROOT = Path(__file__).parents[1]
SEED_LISTING = [ROOT / "shared" / "seeds" / "papers.txt", ROOT.parent / "shared" / "seeds" / "papers.txt"]
runner = CliRunner()


def show(*args: str):
    return runner.invoke(app, ["show", *args])


def test_version():
    p = subprocess.run([sys.executable, "-m", "distill.cli", "--version"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"distill {distill.__version__}"


def test_show_kd_parameters_paper_and_recipe():
    r = show("kd")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert re.search(r"^\s+temperature\s+float\b.*\s4\.0(\s|$)", out, re.M), out
    assert re.search(r"^\s+ce_weight\s+.*\s0\.1\s+weight of CE on labeled samples", out, re.M), out
    assert "Hinton KD" in out  # the registry's one-line description
    assert "Distilling the Knowledge in a Neural Network" in out and "Hinton et al. 2015" in out
    assert "1503.02531" in out
    assert "Logit Standardization in Knowledge Distillation" in out  # S35, kd's standardize option
    assert str(shipped_recipe("mnist1d-kd")) in out


def test_show_lm_kd():
    r = show("lm_kd")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert re.search(r"^\s+kind\s+forward_kl \| reverse_kl .*\"forward_kl\"", out, re.M), out
    assert re.search(r"^\s+beta\s+float ≥ 0, ≤ 1\s+0\.5\s", out, re.M), out
    assert P.PAPERS["B3"].title in out
    assert str(shipped_recipe("arithmetic-lm_kd")) in out


@pytest.mark.parametrize("name", sorted(e.name for e in METHODS.entries()))
def test_show_every_method(name):
    r = show(name)
    assert r.exit_code == 0, r.output
    ps = P.method_papers(name)
    assert ps is not None
    for p in ps:
        assert p.title in r.stdout
    if not ps:
        assert "paper: none" in r.stdout


def test_unknown_method_is_one_line_with_a_suggestion():
    r = show("kdd")
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unknown" in lines[0] and "did you mean 'kd'" in lines[0]


def test_show_paper_id_task_and_arch():
    r = show("s35")  # case-insensitive
    assert r.exit_code == 0, r.output
    assert "Logit Standardization in Knowledge Distillation" in r.stdout
    assert "Sun et al. 2024" in r.stdout and "https://arxiv.org/abs/2403.01427" in r.stdout
    assert "method kd" in r.stdout and "method dkd" in r.stdout
    r = show("mnist1d")
    assert r.exit_code == 0, r.output
    assert re.search(r"^\s+num_train\s+int ≥ 10\s+4000\s", r.stdout, re.M), r.stdout
    assert str(shipped_recipe("mnist1d-kd")) in r.stdout
    r = show("hf")
    assert r.exit_code == 0 and re.search(r"^\s+path\s+str \| None\s+null\s", r.stdout, re.M), r.stdout


def test_papers_lists_every_entry():
    r = runner.invoke(app, ["papers"])
    assert r.exit_code == 0, r.output
    for p in P.PAPERS.values():
        assert f"{p.id} " in r.stdout and p.title in r.stdout


# --- the paper table --------------------------------------------------------------------------------


def test_every_method_has_a_paper_entry_or_says_none():
    """A new method must be added to distill.papers.METHOD_PAPERS: its paper ids, or () for none."""
    registered = {e.name for e in METHODS.entries()}
    missing = registered - set(P.METHOD_PAPERS)
    assert not missing, f"methods without an entry in distill.papers.METHOD_PAPERS: {sorted(missing)}"
    stale = set(P.METHOD_PAPERS) - registered
    assert not stale, f"METHOD_PAPERS names methods that are not registered: {sorted(stale)}"
    for ids in [*P.METHOD_PAPERS.values(), *P.FEATURE_PAPERS.values()]:
        for i in ids:
            assert i in P.PAPERS, i


def test_table_holds_every_catalogue_id_and_consistent_fields():
    ids = [f"S{i:02d}" for i in range(1, 61)] + [f"B{i}" for i in range(1, 7)]
    assert set(ids) <= set(P.PAPERS)
    for p in P.PAPERS.values():
        assert p.title
        if p.arxiv:
            assert re.fullmatch(r"\d{4}\.\d{4,5}", p.arxiv), p
            assert p.year == 2000 + int(p.arxiv[:2]), p  # the year of the preprint's first version
        assert p.authors == "" or re.fullmatch(r"[A-Z][\w-]+( et al\.| & [A-Z][\w-]+)?", p.authors), p


def _listing_titles(path: Path) -> list[str]:
    """The seed listing's titles in order: a title line, its abstract, optionally an author/date block."""
    blocks = [b.strip().splitlines() for b in re.split(r"\n\s*\n", path.read_text()) if b.strip()]
    start = next(i for i, b in enumerate(blocks) if len(b) == 1 and i + 1 < len(blocks) and len(blocks[i + 1][0]) > 300)
    titles, i = [], start
    while i < len(blocks):
        titles.append(blocks[i][0].strip())
        i += 2
        if i < len(blocks) and "·" in [x.strip() for x in blocks[i]]:
            i += 1
    return titles


def test_ids_follow_the_seed_listing():
    path = next((p for p in SEED_LISTING if p.is_file()), None)
    if path is None:
        pytest.skip("the seed listing (shared/seeds/papers.txt) is not in this checkout")
    titles = _listing_titles(path)
    assert len(titles) == 60
    for i, title in enumerate(titles, 1):
        assert P.PAPERS[f"S{i:02d}"].title == title


def test_readme_paper_table_matches_the_module():
    text = (ROOT / "README.md").read_text()
    section = text.split("### Papers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| (S\d\d|B\d|\w+\d{4}) \|", line)]
    ids = [r.split("|")[1].strip() for r in rows]
    assert rows == P.markdown_rows(ids)
    cited = set(re.findall(r"(?<!–)\b(S[0-6]\d|B[1-6])\b(?!–)", text))  # not the ranges "B1–B6", "S01–S60"
    assert cited <= set(ids), f"ids cited in the README but missing from its Papers table: {sorted(cited - set(ids))}"


# --- docs cited by docstrings -----------------------------------------------------------------------


def test_docs_cited_in_docstrings_exist():
    cited: dict[str, set[str]] = {}
    for f in (ROOT / "src" / "distill").rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"(docs/[\w./-]+\.md)``?(?:,\s*\"([^\"]+)\")?", text):
            cited.setdefault(m.group(1), set())
            if m.group(2):
                cited[m.group(1)].add(m.group(2))
    assert "docs/conventions.md" in cited
    for doc, sections in cited.items():
        path = ROOT / doc
        assert path.is_file(), f"{doc} is cited in a docstring but does not exist"
        headings = {h.strip().lower() for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
        for s in sections:
            assert s.lower() in headings, f"{doc} has no section '{s}' (headings: {sorted(headings)})"
