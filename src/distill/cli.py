"""The ``distill`` command line: run | cache-teacher | bench | list | eval | demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from distill.errors import DistillError, Interrupted, MissingFileError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation: train a small student from a large teacher with a proven method.")
out_console = Console()
err_console = Console(stderr=True)


def _fail(err: DistillError) -> None:
    if isinstance(err, Interrupted):
        err_console.print(f"[yellow]{escape(str(err))}[/]; continue with the same command plus --resume")
        raise typer.Exit(130)
    err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)  # '[vllm]' is text
    raise typer.Exit(2)


def _metrics_table(title: str, metrics: dict[str, float]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


@app.command()
def run(
    recipe: str = typer.Argument(..., help="recipe file, or the name of a shipped recipe (see `distill list`)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set method.temperature=2"),
    out: Path = typer.Option(Path("runs"), "--out", help="folder that receives the run folder"),
    name: Optional[str] = typer.Option(None, help="run folder name (default: the recipe's name)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run folder"),
) -> None:
    """Train a student from RECIPE and write a run folder."""
    from distill.core.recipe import load_recipe
    from distill.core.runner import run_recipe

    try:
        r = load_recipe(recipe, set_)
        res = run_recipe(r, out=out, name=name, resume=resume, overwrite=overwrite)
    except DistillError as err:
        _fail(err)
    out_console.print(_metrics_table(f"{r.name} -> {res.run_dir}", res.metrics))


@app.command("cache-teacher")
def cache_teacher(
    recipe: str = typer.Argument(..., help="recipe whose task and teacher (recipe, run or model) to cache"),
    top_k: int = typer.Option(..., "--top-k", min=1, help="token ids and log-probs kept per position"),
    out: Path = typer.Option(..., "--out", help="cache folder; train from it with 'teacher: {cache: DIR}'"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set task.num_train=500"),
    dtype: str = typer.Option("float16", "--dtype", help="float16 | bfloat16 (the log-probs)"),
    shard_size: int = typer.Option(1024, "--shard-size", min=1, help="samples per shard"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="samples per teacher forward"),
    runs: Path = typer.Option(Path("runs"), "--runs", help="where a teacher recipe is trained (<runs>/_teachers)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a cache written with other settings"),
) -> None:
    """Run RECIPE's teacher once over its task's training split and store its top-k log-probs in DIR.
    Interrupted, the same command resumes after the last complete shard."""
    from distill.core.recipe import load_recipe
    from distill.lm.cache import bytes_per_token, cache_from_recipe, read_manifest

    try:
        r = load_recipe(recipe, set_)
        folder = cache_from_recipe(r, out, top_k, dtype, shard_size, batch_size, runs, progress=True,
                                   overwrite=overwrite)
        m = read_manifest(folder)
    except DistillError as err:
        _fail(err)
    except KeyboardInterrupt:
        err_console.print(f"[yellow]interrupted[/]: complete shards in {out} are kept; run the same command again "
                          "to resume", highlight=False, soft_wrap=True)
        raise typer.Exit(130)
    out_console.print(f"{folder}: {m['num_samples']} samples, {m['rows']} tokens, top-{m['k']} {m['dtype']}, "
                      f"{bytes_per_token(m):.1f} bytes/token", highlight=False, soft_wrap=True)


def _floats(items: list[str], what: str) -> list[float]:
    """``--weights 0.3 --weights 0.7``, ``--weights 0.3,0.7`` or ``--weights "0.3 0.7"``."""
    from distill.errors import RecipeError

    parts = [p for item in items for p in item.replace(",", " ").split()]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise RecipeError(f"{what}: expected numbers, got {' '.join(parts)!r}") from None


@app.command()
def merge(
    models: list[Path] = typer.Argument(..., help="model or run folders of one architecture"),
    weights: list[str] = typer.Option([], "--weights", help="one weight per model, e.g. --weights 0.3,0.7 "
                                      "(normalised to sum to 1; default: equal)"),
    out: Path = typer.Option(..., "--out", help="the merged HF model folder"),
    base: Optional[Path] = typer.Option(None, "--stage-two", "--base",
                                        help="BAI stage two: merge the stage-one result with this (pretrained) model"),
    base_weight: Optional[float] = typer.Option(None, "--base-weight",
                                                help="the base model's share in stage two, in [0, 1]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder"),
) -> None:
    """Weighted merge of checkpoints (S33 BAI): stage 1 sum_i w_i theta_i; with --stage-two BASE,
    stage 2 (1 - b) theta_merge + b theta_BASE, b = --base-weight."""
    from distill.errors import RecipeError
    from distill.lm.merge import merge_models

    try:
        w = _floats(weights, "--weights") if weights else [1.0] * len(models)
        if (base is None) != (base_weight is None):
            raise RecipeError("--stage-two BASE and --base-weight go together")
        folder = merge_models(models, w, out, base, base_weight, overwrite=overwrite)
    except DistillError as err:
        _fail(err)
    total = sum(w)
    shown = ", ".join(f"{m} × {x / total:.4g}" for m, x in zip(models, w))
    stage_two = f"; stage two: base {base} × {base_weight:.4g}" if base is not None else ""
    out_console.print(f"{folder}: {shown}{stage_two}", highlight=False, soft_wrap=True)


@app.command("analyze-traces")
def analyze_traces(
    teacher: list[Path] = typer.Option(..., "--teacher", help="a teacher run or model folder (sampled here), or a "
                                       "trace JSONL with prompt/completion; repeat for several"),
    out: Path = typer.Option(..., "--out", help="folder for traces_report.md, traces.csv, traces.png, traces/"),
    task: str = typer.Option("arithmetic", "--task", help="a language-model task with prompts and a verifier"),
    set_: list[str] = typer.Option([], "--set", help="a task parameter, e.g. --set num_train=500"),
    student: Optional[Path] = typer.Option(None, "--student", help="score the traces' perplexity under this model"),
    samples: int = typer.Option(4, "--samples", min=1, help="traces per prompt"),
    prompts: int = typer.Option(64, "--prompts", min=1, help="the first N prompts of the split"),
    split: str = typer.Option("train", "--split", help="train | val | test"),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-6),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="default: the task's"),
    seed: int = typer.Option(0, "--seed"),
    sft_k: int = typer.Option(0, "--sft-k", min=0, help="write sft.jsonl: up to K diverse correct traces per prompt"),
    sft_from: str = typer.Option("best", "--sft-from", help="best | all | a teacher label"),
) -> None:
    """Per teacher: trace lengths, diversity, correctness and perplexity under the student; teachers
    ranked; optionally diverse verified traces as SFT data (S51 source analysis, S19 DED)."""
    from distill.errors import RecipeError
    from distill.lm.tools.traces import analyze_traces as analyze
    from distill.lm.tools.traces import build_lm_task

    try:
        if split not in ("train", "val", "test"):
            raise RecipeError(f"--split '{split}': use train, val or test")
        data = build_lm_task(task, set_)
        rep = analyze(teacher, data, out, student=student, split=split, num_prompts=prompts, samples=samples,
                      temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, sft_k=sft_k,
                      sft_from=sft_from,
                      on_teacher=lambda t: err_console.print(f"  sampling/reading {t}", highlight=False))
    except DistillError as err:
        _fail(err)
    table = Table(title=f"teachers, best first ({out}/traces_report.md)")
    cols = ("rank", "teacher", "accuracy", "len_mean", "len_cv", "pairwise_diversity", "student_ppl_correct")
    for c in cols:
        table.add_column(c, justify="left" if c == "teacher" else "right")
    for r in rep.rows:
        table.add_row(*(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    out_console.print(table)
    if rep.sft_path is not None:
        out_console.print(f"{rep.sft_path}: {rep.sft_records} SFT records", highlight=False)


@app.command()
def hacking(
    steps: Optional[int] = typer.Option(None, "--steps", help="student updates per regime (default 600; 12 with --quick)"),
    out: Path = typer.Option(Path("runs/hacking"), "--out", help="folder for hacking.png, hacking.csv and hacking.md"),
    seed: int = typer.Option(0, "--seed", help="seed of the oracle, teacher, prompts and student"),
    quick: bool = typer.Option(False, "--quick", help="tiny sizes, a few seconds (smoke test)"),
) -> None:
    """Teacher hacking (S21): oracle -> teacher -> student on tiny LMs; proxy (to the teacher) and golden (to
    the oracle) curves for offline data, online generation and more generations per prompt, with the
    paper's detection signal (deviation from polynomial convergence) and a plot."""
    from distill.lm.tools.hacking import HackingConfig, run_hacking, write_outputs

    try:
        over = {"seed": seed} | ({} if steps is None else {"steps": steps})
        cfg = HackingConfig.quick(**over) if quick else HackingConfig(**over)
        res = run_hacking(cfg, progress=lambda m: out_console.print(m, highlight=False, soft_wrap=True))
        paths = write_outputs(res, out)
    except DistillError as err:
        _fail(err)
    table = Table(title=f"teacher hacking ({cfg.steps} steps, seed {cfg.seed}; teacher's golden {res.teacher_golden:.4f})")
    table.add_column("regime", no_wrap=True)
    for col in ("proxy", "min golden", "golden", "hacking", "detected"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in res.summary():
        table.add_row(s["regime"], f"{s['final_proxy']:.4f}", f"{s['min_golden']:.4f}", f"{s['final_golden']:.4f}",
                      "yes" if s["hacking"] else "no", "yes" if s["detected"] else "no")
    out_console.print(table)
    out_console.print("proxy, golden: final distances to the teacher and the oracle; hacking: the golden metric rose "
                      "while the proxy fell (uses the oracle); detected: the proxy left its power law (no oracle)",
                      highlight=False, soft_wrap=True)
    out_console.print(f"{paths['png'].name}, {paths['csv'].name} and {paths['md'].name} in {out}/", highlight=False)


@app.command("search-student")
def search_student(
    teacher: str = typer.Argument(..., help="a teacher recipe (name or file) or a finished teacher run folder"),
    candidates: str = typer.Option("grid", "--candidates", help="'grid' (12 convnet/mlpnet/vit students of "
                                   "varied size), 'budget' (10 of 2.7k-6.5k parameters on digits) or a YAML list of "
                                   "{arch: ..., <params>, label: ...}"),
    out: Path = typer.Option(Path("runs/diswot"), "--out", help="folder for diswot.md, diswot.csv, diswot.json "
                             "(+ diswot.png with --train)"),
    train: bool = typer.Option(False, "--train", help="distil every candidate with kd and report the rank correlation "
                               "of the score with its test accuracy"),
    runs: Path = typer.Option(Path("runs"), "--runs", help="where the candidates' KD runs and a teacher recipe train"),
    name: str = typer.Option("diswot", "--name", help="prefix of the candidates' run folders (<runs>/<name>-<label>)"),
    set_: list[str] = typer.Option([], "--set", help="a key of every candidate's KD recipe, e.g. --set train.epochs=30"),
    batch_size: int = typer.Option(64, "--batch-size", min=2, help="the one batch the score is computed on"),
    seed: int = typer.Option(0, "--seed", help="seed of the batch, the initialisations and the KD runs"),
    semantic: str = typer.Option("auto", "--semantic", help="auto | ickd (official, equal widths) | class (any widths)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an --out folder this command wrote"),
) -> None:
    """DisWOT (S59): rank candidate students for TEACHER without training, by the similarity of their
    features and classifier gradients to the teacher's at random initialisation on one batch; with
    --train, check the ranking against their accuracy after KD (Spearman, Kendall)."""
    from distill.errors import RecipeError
    from distill.core.rundir import check_tool_out
    from distill.features.tools.diswot import MARKER, search_students, write_outputs

    try:
        if semantic not in ("auto", "ickd", "class"):
            raise RecipeError(f"--semantic '{semantic}': use auto, ickd or class")
        check_tool_out(out, MARKER, overwrite)
        res = search_students(teacher, candidates, train=train, runs=runs, name=name, batch_size=batch_size,
                              seed=seed, semantic=semantic, train_set=set_,
                              progress=lambda m: err_console.print(m, highlight=False))
        folder = write_outputs(res, out, overwrite)
    except DistillError as err:
        _fail(err)
    table = Table(title=f"DisWOT ranking of {len(res.rows)} students for {teacher} (higher score = predicted better)")
    for c in ("rank", "candidate", "params", "score", "−SP", "−semantic") + (("KD accuracy",) if train else ()):
        table.add_column(c, justify="left" if c == "candidate" else "right", no_wrap=True)
    for r in sorted(res.rows, key=lambda r: r.rank):
        cells = [str(r.rank), r.label, str(r.params), f"{r.score:.4g}", f"{-r.relation:.4g}", f"{-r.semantic:.4g}"]
        table.add_row(*cells, *((f"{100 * r.accuracy:.2f} %",) if train else ()))
    Console(width=max(out_console.width, 110)).print(table)
    for k, v in res.correlations.items():
        out_console.print(f"{k:<18} Spearman {v['spearman']:+.3f}  Kendall {v['kendall']:+.3f}", highlight=False)
    out_console.print(f"diswot.md, diswot.csv{', diswot.png' if train else ''} in {folder}/", highlight=False)


@app.command("prune-layers")
def prune_layers(
    model: str = typer.Argument(..., help="an HF causal-LM folder, a run folder, or an LM recipe (e.g. pytext-teacher)"),
    drop: int = typer.Option(..., "--drop", min=1, help="contiguous decoder layers to remove"),
    out: Path = typer.Option(..., "--out", help="the pruned HF model folder (+ ppcl.md, ppcl_layers.csv, ppcl.png)"),
    distill_steps: int = typer.Option(200, "--distill-steps", min=0, help="layer-wise distillation steps (0: none)"),
    mode: str = typer.Option("teacher_forced", "--mode", help="teacher_forced (PPCL's non-sequential) | sequential"),
    span: Optional[int] = typer.Option(None, "--span", min=0, help="drop the span starting at this layer instead of "
                                       "the best-scored one"),
    baselines: bool = typer.Option(False, "--baselines", help="also drop (and distil) the last span and a random one"),
    task: Optional[str] = typer.Option(None, "--task", help="the data of a bare model folder (e.g. jsonl)"),
    task_set: list[str] = typer.Option([], "--task-set", help="a task parameter (e.g. train=FILE), or with a recipe "
                                       "a recipe key (e.g. student.layers=8)"),
    runs: Path = typer.Option(Path("runs"), "--runs", help="where a recipe is trained (<runs>/_teachers)"),
    lr: float = typer.Option(1e-3, "--lr", min=0.0),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    probe_tokens: int = typer.Option(4096, "--probe-tokens", min=16, help="training tokens for the CKA and probes"),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", min=1, help="test sequences for the perplexities "
                                             "(default: all)"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an --out folder this command wrote"),
) -> None:
    """PPCL (S15): find the most redundant span of DROP contiguous layers (linear probes + the CKA trend
    along depth), remove it, distil the pruned model layer-wise from the full one; writes an HF folder."""
    from distill.errors import RecipeError
    from distill.core.rundir import check_tool_out
    from distill.features.tools.ppcl import MARKER, run_ppcl, write_outputs

    try:
        if mode not in ("teacher_forced", "sequential"):
            raise RecipeError(f"--mode '{mode}': use teacher_forced or sequential")
        check_tool_out(out, MARKER, overwrite)
        res, pruned, data = run_ppcl(model, drop, distill_steps, mode=mode, span=span, task=task, task_set=task_set,
                                     runs=runs, seed=seed, baselines=baselines, lr=lr, batch_size=batch_size,
                                     probe_tokens=probe_tokens, eval_limit=eval_limit,
                                     progress=lambda m: err_console.print(m, highlight=False))
        folder = write_outputs(res, pruned, data, out, overwrite)
    except DistillError as err:
        _fail(err)
    table = Table(title=f"{res.layers} layers -> {res.layers - res.drop}; full model test perplexity {res.teacher_ppl:.3f}")
    for c in ("dropped", "chosen by", "perplexity dropped", f"after {res.steps} steps"):
        table.add_column(c, justify="right", no_wrap=True)
    for r in res.runs:
        after = f"{r.ppl_distilled:.3f}" if r.ppl_distilled is not None else "—"
        table.add_row(f"{r.start}..{r.start + res.drop - 1}", r.name, f"{r.ppl_dropped:.3f}", after)
    out_console.print(table)
    out_console.print(f"pruned model ({res.params_pruned} parameters), ppcl.md, ppcl_layers.csv, ppcl.png in {folder}/",
                      highlight=False, soft_wrap=True)


@app.command("list")
def list_() -> None:
    """Methods, tasks, architectures, model references, plug-ins, shipped recipes and suites, one line each."""
    from distill.bench.suite import shipped_suites
    from distill.core.recipe import shipped_recipes
    from distill.core.registry import ARCHS, METHODS, REFS, TASKS, load_plugins

    try:
        plugins = load_plugins()
    except DistillError as err:
        _fail(err)
    core_refs = [("recipe", "a teacher recipe, trained once and cached in <out>/_teachers"),
                 ("run", "a finished run folder"), ("model", "a model folder (e.g. HF save_pretrained)")]
    sections = [(title, [(e.name, e.description) for e in reg.entries()])
                for title, reg in (("methods", METHODS), ("tasks", TASKS), ("archs", ARCHS))]
    sections.append(("model references (teacher:, init:)", core_refs + [(e.name, e.description) for e in REFS.entries()]))
    for title, rows in sections:
        out_console.print(f"[bold]{title}[/]")
        for name, description in rows:
            out_console.print(f"  {name:<16} {description}", highlight=False, soft_wrap=True)
    out_console.print("[bold]plug-ins[/] " + "; ".join(plugins), highlight=False, soft_wrap=True)
    out_console.print("[bold]recipes[/]  " + " ".join(shipped_recipes()), highlight=False, soft_wrap=True)
    out_console.print("[bold]suites[/]   " + " ".join(shipped_suites()), highlight=False)


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="a finished run folder")) -> None:
    """Evaluate a run folder's student on its task's test split again."""
    import yaml

    from distill.core.recipe import recipe_from_dict
    from distill.core.runner import build_task, resolve_teacher, task_ops

    try:
        path = run_dir / "recipe.yaml"
        if not path.is_file():
            raise DistillError(f"{run_dir} is not a run folder (no recipe.yaml)")
        data = yaml.safe_load(path.read_text())
        data["train"] = {**data.get("train", {}), "trackers": "none"}  # evaluating logs nowhere (and needs no tracker)
        recipe = recipe_from_dict(data, base_dir=run_dir)
        ops = task_ops(build_task(recipe))
        student = ops.load_model(run_dir)
        try:  # never trains: a run folder copied elsewhere is evaluated without its teacher
            t_dir = resolve_teacher(recipe, run_dir.parent, progress=True, train=False) if recipe.teacher else None
        except MissingFileError as err:
            err_console.print(f"[yellow]note:[/] teacher metrics left out: {err}", highlight=False, soft_wrap=True)
            t_dir = None
        teacher = ops.load_model(t_dir) if t_dir else None
        metrics = ops.final_metrics(student, teacher)
    except DistillError as err:
        _fail(err)
    out_console.print(_metrics_table(str(run_dir), metrics))


def _bench(suite: str, seeds: Optional[int], out: Optional[Path], set_: list[str],
           teachers: Optional[Path] = None, jobs: int = 1) -> None:
    from distill.bench.leaderboard import cell, columns, profile, teacher_metrics
    from distill.bench.suite import run_suites

    def on_run(label: str, seed: int, res) -> None:
        m = res.metrics
        if "test/accuracy" in m and "test/ece" in m:
            shown = f"accuracy {100 * m['test/accuracy']:.2f} %  ECE {m['test/ece']:.4f}"
        elif "test/exact_match" in m:
            shown = f"exact match {100 * m['test/exact_match']:.2f} %  perplexity {m['test/perplexity']:.3f}"
        else:  # a task of its own: its first test metrics
            shown = "  ".join(f"{k.removeprefix('test/')} {v:.4g}" for k, v in m.items()
                              if k.startswith("test/") and not k.endswith("_floor"))[:80]  # floors: data vs data
        out_console.print(f"  [green]✓[/] {label:<14} seed {seed}  {shown}  ({m.get('time/train_s', 0):.1f} s)",
                          highlight=False)

    try:
        results, folder = run_suites(suite, out=out, seeds=seeds, overrides=set_, on_run=on_run, teachers=teachers,
                                     jobs=jobs)
    except DistillError as err:
        _fail(err)
    for part, rows, _ in results:
        n = len(rows[0].runs)
        table = Table(title=f"{part.name} ({n} seeds, mean ± std, test split)" if n > 1 else
                      f"{part.name} (one seed, test split)")
        table.add_column("method", no_wrap=True)
        prof = profile(rows, part.metrics)
        cols = columns(rows, prof)
        for _, title, _ in cols:
            table.add_column(title, justify="right", no_wrap=True)
        for row in rows:
            table.add_row(row.label, *(cell(row, key) for key, _, _ in cols))
        wide = Console(width=max(out_console.width, 30 + 20 * len(cols)))
        wide.print(table)
        t = teacher_metrics(rows)
        if t:
            wide.print(prof.teacher_line(t), highlight=False)
    out_console.print(f"leaderboard.md, leaderboard.csv and plots in {folder}/", highlight=False)


@app.command()
def bench(
    suite: str = typer.Argument(..., help="suite file or shipped suite name"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="seeds per recipe (default: the suite's)"),
    out: Optional[Path] = typer.Option(None, "--out", help="default: runs/bench/<suite>"),
    set_: list[str] = typer.Option([], "--set", help="override a key in every recipe"),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="runs at once, one process each (CPU cores or one GPU shared)"),
) -> None:
    """Run every recipe of SUITE over several seeds and write a leaderboard (Markdown, CSV, plots)."""
    _bench(suite, seeds, out, set_, jobs=jobs)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1),
) -> None:
    """MNIST-1D: a teacher, then a much smaller student with ce, kd, dkd and kd + standardization."""
    _bench("demo", seeds, out, [], teachers=Path("runs") if out == Path("runs/demo") else None)  # shared teacher


def _print_version(value: bool) -> None:
    if value:
        from distill import __version__

        out_console.print(f"distill {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    pass


def _type_name(field) -> str:
    """A parameter's type for people: ``float ≥ 0``, ``forward_kl | reverse_kl``, ``int | None``."""
    import typing

    ann = field.annotation
    if typing.get_origin(ann) is typing.Literal:
        shown = " | ".join(str(a) for a in typing.get_args(ann))
    elif isinstance(ann, type):
        shown = ann.__name__
    else:
        shown = str(ann).replace("typing.", "").replace("NoneType", "None")
    symbols = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    bounds = [f"{sym} {getattr(m, k)}" for m in field.metadata for k, sym in symbols.items() if hasattr(m, k)]
    return f"{shown} {', '.join(bounds)}" if bounds else shown


def _default(field) -> str:
    import json

    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined and field.default_factory else field.default
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, ensure_ascii=False, default=str)


def _print_params(params, section: str) -> None:
    fields = params.model_fields
    if not fields:
        out_console.print(f"[bold]parameters[/] ({section}): none", highlight=False)
        return
    out_console.print(f"[bold]parameters[/] ({section}; change one with --set {section.split(':')[0]}.KEY=VALUE)",
                      highlight=False, soft_wrap=True)
    rows = [(k, _type_name(f), _default(f), f.description or "") for k, f in fields.items()]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for name, typ, default, desc in rows:
        line = f"  {name:<{w[0]}}  {typ:<{w[1]}}  {default:<{w[2]}}  {desc}".rstrip()
        out_console.print(line, highlight=False, soft_wrap=True, markup=False)


def _print_paper(label: str, p) -> None:
    out_console.print(f"{label:<7}{p.id:<5}{p.title}" if len(p.id) < 5 else f"{label:<7}{p.id}  {p.title}",
                      highlight=False, soft_wrap=True, markup=False)
    more = ", ".join(x for x in (p.cite(), p.url) if x and x != "—")
    if more or not p.note:
        out_console.print(f"{'':<12}{more or 'authors, year and arXiv id: not known here'}", highlight=False,
                          soft_wrap=True, markup=False)
    if p.note:
        out_console.print(f"{'':<12}({p.note})", highlight=False, soft_wrap=True, markup=False)


def _recipes_using(section: str, key: str, name: str) -> list[tuple[str, str]]:
    """Shipped recipes whose ``section`` (or a stage's) names ``name``: (recipe, where)."""
    import yaml

    from distill.core.recipe import shipped_recipe, shipped_recipes

    def named(block) -> bool:
        return block == name or (isinstance(block, dict) and block.get(key) == name)

    found = []
    for r in shipped_recipes():
        try:
            data = yaml.safe_load(shipped_recipe(r).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if named(data.get(section)):
            found.append((r, ""))
        found += [(r, f"stage {s.get('name', i)}") for i, s in enumerate(data.get("stages") or [])
                  if isinstance(s, dict) and named(s.get(section)) and not named(data.get(section))]
    return found


def _print_recipes(found: list[tuple[str, str]]) -> None:
    from distill.core.recipe import shipped_recipe

    if not found:
        out_console.print("[bold]recipes[/]: no shipped recipe uses it", highlight=False)
        return
    out_console.print("[bold]recipes[/] (distill run NAME; copy the file to start your own)", highlight=False)
    w = max(len(r) for r, _ in found)
    for r, where in found:
        extra = f"  ({where})" if where else ""
        out_console.print(f"  {r:<{w}}  {shipped_recipe(r)}{extra}", highlight=False, soft_wrap=True, markup=False)


@app.command()
def show(name: str = typer.Argument(..., help="a method, task or arch name (`distill list`), or a paper id (S35, B1)")) -> None:
    """A method's description, paper(s), parameters with defaults and shipped recipes; a task's or an
    arch's parameters; or a paper id's title, authors, year and arXiv id."""
    from distill import papers
    from distill.core.registry import ARCHS, METHODS, TASKS, load_plugins
    from distill.errors import RecipeError, did_you_mean

    try:
        load_plugins()
        shown = False
        if name in METHODS:
            e = METHODS.get(name)
            out_console.print(f"[bold]{e.name}[/] (method): {e.description}", highlight=False, soft_wrap=True)
            ps = papers.method_papers(name)
            if ps is None:
                out_console.print("paper: not recorded (no entry in distill.papers.METHOD_PAPERS)", highlight=False)
            elif not ps:
                out_console.print("paper: none (a baseline)", highlight=False)
            for i, p in enumerate(ps or []):
                _print_paper("paper" if i == 0 else "also", p)
            _print_params(e.params, f"method: {{name: {name}, ...}}")
            _print_recipes(_recipes_using("method", "name", name))
            shown = True
        for reg, kind, section, key in ((TASKS, "task", "task", "name"), (ARCHS, "arch", "student", "arch")):
            if name in reg:
                e = reg.get(name)
                out_console.print(f"[bold]{e.name}[/] ({kind}): {e.description}", highlight=False, soft_wrap=True)
                _print_params(e.params, f"{section}: {{{key}: {name}, ...}}")
                _print_recipes(_recipes_using(section, key, name))
                shown = True
        paper = papers.find(name)
        if paper is not None:
            _print_paper("paper", paper)
            users = papers.used_by(paper.id)
            out_console.print(f"used by: {'; '.join(users) if users else 'nothing implemented yet'}",
                              highlight=False, soft_wrap=True, markup=False)
            shown = True
        if not shown:
            known = [e.name for reg in (METHODS, TASKS, ARCHS) for e in reg.entries()] + list(papers.PAPERS)
            raise RecipeError(f"unknown method, task, arch or paper id '{name}'{did_you_mean(name, known)}; "
                              "`distill list` shows the names, `distill papers` the paper ids")
    except DistillError as err:
        _fail(err)


@app.command()
def papers() -> None:
    """Every paper id cited in docstrings, recipes and the README: title, authors, year, arXiv id."""
    from distill import papers as P

    width = max(len(p.id) for p in P.PAPERS.values()) + 1
    for p in P.PAPERS.values():
        users = [u.removeprefix("method ") for u in P.used_by(p.id)]
        used = f"  [{', '.join(users)}]" if users else ""
        cite = p.cite() if p.cite() != "—" else (p.note or "—")
        out_console.print(f"{p.id:<{width}}{p.title}  ({cite}){used}", highlight=False, soft_wrap=True, markup=False)


def main() -> None:  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
