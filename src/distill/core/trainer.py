"""The engine: one training loop for every method, on HF Accelerate.

It places the distiller on the device(s), builds one optimizer (and schedule) per parameter group
the distiller declares, runs gradient accumulation and mixed precision, evaluates, stops early,
checkpoints (weights, optimizers, schedules, RNG, method state) and resumes exactly. A SIGINT ends
the current step, writes a checkpoint and raises ``Interrupted``.

Progress: a rich bar when stdout is a terminal; otherwise (nohup, Slurm, a pipe) a line on stderr every
``train.progress_every`` seconds (default 30). Both name the run; a teacher or init recipe trained into
the cache (``<out>/_teachers/<name>-<fingerprint>``) reads ``teacher <name>``.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from distill.core import checkpoint as ckpt
from distill.core.distiller import Distiller
from distill.core.recipe import TrainConfig
from distill.core.rundir import PARTIAL
from distill.core.sampler import make_sampler
from distill.core.sharpness import SAM, TRAM
from distill.errors import Interrupted, NaNLossError, RecipeError

EvalFn = Callable[[nn.Module], dict[str, float]]
PROGRESS_EVERY = 30.0  # seconds between progress lines when stdout is not a terminal (train.progress_every)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float, momentum: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class LRFactor:
    """Multiplier of the base learning rate at an optimizer step: warm-up, then the schedule."""

    def __init__(self, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> None:
        self.kind, self.warmup = cfg.schedule, cfg.warmup_steps
        self.total, self.spe = total_steps, steps_per_epoch
        self.milestones, self.gamma = list(cfg.milestones), cfg.gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "cosine":
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if self.kind == "step":
            return self.gamma ** sum(step >= m * self.spe for m in self.milestones)
        return 1.0


class EpochBatches:
    """Deterministic micro-batches: epoch e's order depends only on (seed, e), so a resume can
    jump to any step without replaying data. With several processes, batch b goes to process
    b mod P (every process gets the same number)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = math.ceil(n / batch_size) // world if world > 1 else math.ceil(n / batch_size)
        if self.per_epoch == 0:
            raise RecipeError(f"train.batch_size {batch_size} leaves no batch for {world} processes on {n} samples")

    def epoch(self, e: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        perm = torch.randperm(self.n, generator=g)
        chunks = list(perm.split(self.bs))
        return chunks[self.rank :: self.world][: self.per_epoch]


def fetch(ds: Dataset, idx: Tensor) -> dict[str, Tensor]:
    if hasattr(ds, "__getitems__"):
        return ds.__getitems__(idx)
    return default_collate([ds[int(i)] for i in idx])


def make_sharpness(cfg: TrainConfig, params: list[nn.Parameter], distiller: Distiller | None = None) -> SAM | None:
    if cfg.sharpness == "sam":
        return SAM(params, cfg.sam_rho)
    if cfg.sharpness == "tram":  # TRAM's radius needs the student's outputs on the step's batches
        if distiller is None:
            raise RecipeError("train.sharpness: tram needs the distiller (pass it to make_sharpness)")
        return TRAM(params, distiller, cfg.tram_noise, cfg.tram_noise_type, cfg.tram_scale, cfg.tram_direction or "gradient")
    return None


def new_accelerator(cfg: TrainConfig, run_dir: Path | None) -> Accelerator:
    """An Accelerator for one run, logging to ``train.trackers`` (only with a run folder). TensorBoard
    writes to ``<run>/tensorboard``; the others get project ``distill``, the run named after its folder."""
    AcceleratorState._reset_state()  # several runs in one process may differ in precision
    log_with: list[Any] = []
    if run_dir is not None:
        names = cfg.tracker_names()
        missing = [n for n in names if n not in TrainConfig.accelerate_trackers()[1]]
        if missing:  # validated with the recipe; again here for configs built without validation
            raise RecipeError(f"train.trackers: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
        for n in names:
            if n == "tensorboard":  # its folder is <logging_dir>/<project>: keep <run>/tensorboard
                from accelerate.tracking import TensorBoardTracker

                log_with.append(TensorBoardTracker("tensorboard", str(run_dir)))
            else:
                log_with.append(n)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=log_with or None,
        project_dir=str(run_dir) if run_dir else None,
    )


def run_label(run_dir: Path | None) -> str:
    """What progress calls a run: its folder's name; ``teacher <name>`` for a recipe trained into the
    teacher cache (``<out>/_teachers/<name>-<fingerprint>``, ``core/refs.py``; init recipes too)."""
    if run_dir is None:
        return "train"
    name = run_dir.name.removesuffix(PARTIAL)
    if run_dir.parent.name == "_teachers":
        return "teacher " + re.sub(r"-[0-9a-f]{12}$", "", name)
    return name


class Trainer:
    def __init__(
        self,
        distiller: Distiller,
        train_set: Dataset,
        cfg: TrainConfig,
        seed: int = 0,
        run_dir: Path | None = None,
        evaluate: EvalFn | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.cfg, self.seed, self.run_dir, self.evaluate = cfg, seed, run_dir, evaluate
        self.acc = accelerator or new_accelerator(cfg, run_dir)
        self.train_set = train_set
        groups = distiller.param_groups()
        self.group_names = list(groups)
        unknown = set(cfg.groups) - set(groups)
        if unknown:
            raise RecipeError(f"train.groups: unknown parameter group(s) {sorted(unknown)}; this method has {self.group_names}")
        self.optimizers = []
        for name, params in groups.items():
            o = cfg.groups.get(name)
            lr = o.lr if o and o.lr is not None else cfg.lr
            wd = o.weight_decay if o and o.weight_decay is not None else cfg.weight_decay
            self.optimizers.append(make_optimizer(cfg.optimizer, params, lr, wd, cfg.momentum))
        self.batches = EpochBatches(len(train_set), cfg.batch_size, seed, self.acc.process_index, self.acc.num_processes)
        # a sampler (train.sampler) replaces the epoch permutations; epochs stay a count of steps
        self.sampler = None if cfg.sampler is None else make_sampler(
            cfg.sampler, train_set, distiller, seed, cfg.batch_size, cfg.grad_accum, self.acc.process_index,
            self.acc.num_processes)
        self.steps_per_epoch = math.ceil(self.batches.per_epoch / cfg.grad_accum)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        factor = LRFactor(cfg, self.total_steps, self.steps_per_epoch)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]
        self.distiller = distiller
        self.sharpness = make_sharpness(cfg, [p for ps in groups.values() for p in ps], distiller)
        prepared = self.acc.prepare(distiller, *self.optimizers)
        self.model, self.optimizers = prepared[0], list(prepared[1:])
        # AcceleratedOptimizer.step looks up optional packages (importlib.find_spec) on every call,
        # ~0.3 ms a step; without a grad scaler or XLA it only forwards to the wrapped optimizer.
        plain = self.acc.distributed_type != DistributedType.XLA
        self._opt_steps = [o.optimizer.step if plain and getattr(o, "scaler", None) is None else o.step
                           for o in self.optimizers]
        distiller.on_train_start(self.total_steps, math.ceil(self.total_steps / self.steps_per_epoch))
        if cfg.cache_teacher and isinstance(getattr(train_set, "x", None), Tensor):
            distiller.cache_teacher(train_set.x)
        self.state: dict[str, Any] = {"step": 0, "history": [], "best": None, "bad_evals": 0, "done": False}
        self._stop = False

    # --- public ----------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir else None

    def fit(self, resume: bool = False, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train to the end (or to ``stop_at_step``, then checkpoint and raise ``Interrupted``)."""
        if resume and self.ckpt_dir and ckpt.exists(self.ckpt_dir):
            self.state = ckpt.load(self.ckpt_dir, self.distiller, self.optimizers, self.schedulers, self.acc.device)
            if self.sampler is not None:
                self.sampler.load_state_dict(self.state.get("sampler", {}))
        if self.acc.log_with:
            self.acc.init_trackers("distill", init_kwargs=self._tracker_kwargs())
        prev = self._install_sigint()
        try:
            with self._progress() as bar:
                self._loop(bar, stop_at_step)
        finally:
            if prev is not None:
                signal.signal(signal.SIGINT, prev)
            if self.acc.log_with:
                self.acc.end_training()
        if self.state["best"] is not None and self.cfg.early_stopping and self.ckpt_dir:
            ckpt.load_best(self.ckpt_dir, self.distiller.student)  # select on validation, never test
        return self.state

    # --- the loop --------------------------------------------------------------------------------
    def _loop(self, bar: "_Bar", stop_at_step: int | None) -> None:
        cfg, st = self.cfg, self.state
        self.model.train()
        t0, start = time.perf_counter(), st["step"]
        if self.sampler is not None and st["step"] == 0:
            self._sampler_update(0)
        while st["step"] < self.total_steps and not st["done"]:
            epoch = st["step"] // self.steps_per_epoch
            self.distiller.on_epoch_start(epoch)
            micro = self.batches.epoch(epoch) if self.sampler is None else None
            for k in range(st["step"] - epoch * self.steps_per_epoch, self.steps_per_epoch):
                if micro is not None:
                    group = micro[k * cfg.grad_accum : (k + 1) * cfg.grad_accum]
                else:
                    group = self.sampler.indices(st["step"])
                log_now = (st["step"] + 1) % cfg.log_every == 0 or st["step"] + 1 == self.total_steps
                metrics = self._step(group, log_now)
                st["step"] += 1
                if self.sampler is not None and st["step"] < self.total_steps:  # weights nobody draws with: skip
                    self._sampler_update(epoch)
                if log_now:
                    rate = (st["step"] - start) / max(time.perf_counter() - t0, 1e-9)
                    lr = self.schedulers[0].get_last_lr()[0]
                    self._log({"epoch": epoch, **{f"train/{n}": v for n, v in metrics.items()}, "train/lr": lr})
                    bar.update(st["step"], metrics["loss"], rate)
                else:
                    bar.tick(st["step"])
                end_of_epoch = st["step"] % self.steps_per_epoch == 0 or st["step"] >= self.total_steps
                if end_of_epoch if cfg.eval_every == "epoch" else st["step"] % cfg.eval_every == 0:
                    self._evaluate(epoch)
                if self._stop or st["step"] == stop_at_step:
                    self._checkpoint()
                    raise Interrupted(f"interrupted at step {st['step']}/{self.total_steps}; checkpoint written")
                if st["step"] >= self.total_steps or st["done"]:
                    break
        self._checkpoint()

    def _step(self, group: list[Tensor], want_metrics: bool) -> dict[str, float]:
        batches = self._fetch(group)
        totals = self._grads(batches, want_metrics)
        if self.sharpness is not None:  # gradient again at the adversarial point, then step from w
            self.sharpness.perturb()
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.distiller.replaying = True  # methods must not record state twice
            self._grads(batches, False)
            self.distiller.replaying = False
            self.sharpness.restore()
        if self.cfg.grad_clip:
            self.acc.clip_grad_norm_(self.distiller.parameters(), self.cfg.grad_clip)
        for opt, step, sched in zip(self.optimizers, self._opt_steps, self.schedulers):
            step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        self.distiller.on_optimizer_step()
        return totals

    def _fetch(self, group: list[Tensor]) -> list[dict[str, Tensor]]:
        """The step's micro-batches on the device, as the distiller prepares them (e.g. on-policy
        samples). Where the distiller counts items (valid tokens), every batch gets ``num_items``, the
        count over the whole optimizer step on all processes, so losses summed over items and divided
        by it equal the loss of one big batch whatever the accumulation and process count."""
        batches = [{k: v.to(self.acc.device) for k, v in fetch(self.train_set, idx).items()} for idx in group]
        batches = self.distiller.prepare_batches(batches)
        counts = [self.distiller.count_items(b) for b in batches]
        if counts and counts[0] is not None:
            n = torch.tensor(float(sum(counts)), device=self.acc.device)
            if self.acc.num_processes > 1:
                n = self.acc.reduce(n, reduction="sum")
            for b in batches:
                b["num_items"] = n
        return batches

    def _grads(self, batches: list[dict[str, Tensor]], want_metrics: bool) -> dict[str, float]:
        """Forward and backward over the micro-batches of one optimizer step."""
        totals: dict[str, float] = {}
        n = len(batches)
        # item-normalised losses already carry the step's share; DDP averages gradients over processes
        per_item = "num_items" in batches[0]
        scale = float(self.acc.num_processes) if per_item else 1.0 / n
        for j, batch in enumerate(batches):
            sync = j == n - 1
            ctx = contextlib.nullcontext() if sync or self.acc.num_processes == 1 else self.acc.no_sync(self.model)
            with ctx:
                with self._autocast():
                    out = self.model(batch)
                loss = sum(out.losses.values())
                if not torch.isfinite(loss.detach()).item():
                    self._nan(out.losses)
                self.acc.backward(loss * scale if scale != 1.0 else loss)
            if want_metrics:
                summed = {"loss", *out.losses, *out.summed} if per_item else set()
                for name, v in {"loss": loss, **out.losses, **out.metrics}.items():
                    val = v.detach().float().mean().item() if isinstance(v, Tensor) else float(v)
                    totals[name] = totals.get(name, 0.0) + (val if name in summed else val / n)
        return totals

    def _nan(self, losses: dict[str, Tensor]) -> None:
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        where = (
            f"the last good checkpoint is kept in {self.ckpt_dir}"
            if self.ckpt_dir and ckpt.exists(self.ckpt_dir)
            else "no checkpoint had been written yet"
        )
        raise NaNLossError(
            f"loss {bad or ['total']} became NaN/inf at step {self.state['step'] + 1}; training stopped and {where}. "
            "Lower train.lr, set train.grad_clip, or check the data"
        )

    def _evaluate(self, epoch: int) -> None:
        if self.evaluate is None:
            return
        metrics = self.evaluate(self.distiller.student)
        self._log({"epoch": epoch, **{f"val/{k}": v for k, v in metrics.items()}})
        es = self.cfg.early_stopping
        if es is not None:
            key = es.metric.removeprefix("val/")
            if key not in metrics:
                raise RecipeError(f"train.early_stopping.metric '{es.metric}' is not one of {['val/' + k for k in metrics]}")
            value, best = metrics[key], self.state["best"]
            better = best is None or (value > best if es.mode == "max" else value < best)
            if better:
                self.state["best"], self.state["bad_evals"] = value, 0
                if self.ckpt_dir:
                    ckpt.save_best(self.ckpt_dir, self.distiller.student)
            else:
                self.state["bad_evals"] += 1
                self.state["done"] = self.state["bad_evals"] >= es.patience
        self._checkpoint()

    def _sampler_update(self, epoch: int) -> None:
        logged = self.sampler.update(self.state["step"], self.distiller.student, self.distiller.teacher)
        if logged:
            self._log({"epoch": epoch, **{f"sampler/{k}": v for k, v in logged.items()}})

    def _log(self, row: dict[str, Any]) -> None:
        row = {"step": self.state["step"], **row}
        self.state["history"].append(row)
        if self.acc.log_with:
            self.acc.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"])

    def _checkpoint(self) -> None:
        if self.sampler is not None:  # in the trainer state: state.json
            self.state["sampler"] = self.sampler.state_dict()
        if self.ckpt_dir and self.acc.is_main_process:
            ckpt.save(self.ckpt_dir, self.distiller, self.optimizers, self.schedulers, self.state)

    # --- plumbing --------------------------------------------------------------------------------
    def _autocast(self):
        # Accelerate's autocast context costs a few µs per call even in full precision
        return self.acc.autocast() if self.cfg.mixed_precision != "no" else contextlib.nullcontext()

    def _install_sigint(self):
        def handler(signum, frame):  # finish the step, checkpoint, then stop
            self._stop = True

        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            return None

    def _tracker_kwargs(self) -> dict[str, dict[str, Any]]:
        """Per-tracker ``init`` arguments: the run's name where a tracker takes one, local files in the run."""
        if self.run_dir is None:
            return {}
        name = self.run_dir.name.removesuffix(PARTIAL)
        return {"wandb": {"name": name}, "mlflow": {"run_name": name}, "dvclive": {"dir": str(self.run_dir / "dvclive")}}

    def _progress(self) -> "_Bar":
        every = self.cfg.progress_every if self.cfg.progress_every is not None else PROGRESS_EVERY
        return _Bar(run_label(self.run_dir), self.total_steps, self.state["step"], self.steps_per_epoch,
                    enabled=self.cfg.progress and self.acc.is_main_process, every=every)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Bar:
    """Progress of the loop: a rich bar with the run's name, loss and throughput when stdout is a terminal
    (or Jupyter); otherwise one line on stderr when training starts, every ``every`` seconds (step/total,
    epoch, loss, steps/s, ETA) and at the end, so logs of nohup and batch jobs show it. A no-op when
    disabled."""

    def __init__(self, label: str, total: int, start: int, steps_per_epoch: int, enabled: bool,
                 every: float = PROGRESS_EVERY, console: Any = None) -> None:
        self.label, self.total, self.start, self.spe = label, total, start, steps_per_epoch
        self.enabled, self.every, self.console = enabled, every, console
        self.progress = None
        self.lines = False
        self.step, self.loss = start, float("nan")

    def __enter__(self) -> "_Bar":
        if not self.enabled:
            return self
        from rich.console import Console

        console = self.console or Console()
        if console.is_interactive or console.is_jupyter:
            from rich.markup import escape
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn(f"[bold]{escape(self.label)}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} steps/s"),
                TimeRemainingColumn(), transient=True, console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, loss=float("nan"), rate=0.0)
        else:
            self.lines = True
            self.t0 = self.last = time.perf_counter()
            self.printed = self.start
            epochs = math.ceil(self.total / self.spe)
            resumed = f", resuming at step {self.start}" if self.start else ""
            self._say(f"{self.total} optimizer steps, {epochs} epoch(s) of {self.spe}{resumed}; "
                      f"a line every {self.every:g} s")
        return self

    def update(self, step: int, loss: float, rate: float) -> None:
        """At a logged step: the step's loss and the throughput since the start."""
        self.loss = loss
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=loss, rate=rate)
        self.tick(step)

    def tick(self, step: int) -> None:
        """After every optimizer step (cheap: a clock read when printing lines, else nothing)."""
        self.step = step
        if self.lines and time.perf_counter() - self.last >= self.every:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        rate = (self.step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - self.step) / rate if rate > 0 else float("inf")
        epoch = min(self.step // self.spe + 1, math.ceil(self.total / self.spe))
        self._say(f"step {self.step}/{self.total} (epoch {epoch}/{math.ceil(self.total / self.spe)}), "
                  f"loss {self.loss:.4f}, {rate:.1f} steps/s, ETA {_duration(eta)}")
        self.last, self.printed = now, self.step

    def _say(self, msg: str) -> None:
        print(f"{self.label}: {msg}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.lines and self.step != self.printed:  # where it ended (done, stopped early or interrupted)
            self._line()

