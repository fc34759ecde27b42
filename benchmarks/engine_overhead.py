"""Engine overhead: the same KD training through distill's Trainer and a plain PyTorch loop.

Same models, data, batch order, optimizer, schedule and number of steps; the two are timed in one
process, alternating, and the median of the repeats is compared. Last line: ``ratio: X.XX``
(Trainer time / plain time, both calling the teacher every step; target ≤ 1.10). The Trainer's
default precomputes a frozen teacher's logits once (``train.cache_teacher``); its speed is printed
too, for information.

    .venv/bin/python benchmarks/engine_overhead.py [--steps 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.core.recipe import TrainConfig
from distill.core.trainer import EpochBatches, LRFactor, Trainer
from distill.logits.methods.kd import HintonKD, KDParams, labeled_ce
from distill.logits.losses import kd_loss
from distill.core.distiller import TaskInfo
from distill.tasks.base import ArrayDataset
from distill.tasks.models import build_model

N, BATCH = 4096, 128


def models():
    torch.manual_seed(0)
    teacher = build_model("cnn1d", {"width": 64, "depth": 4}, (40,), 10).eval().requires_grad_(False)
    student = build_model("cnn1d", {"width": 8, "depth": 3}, (40,), 10)
    return teacher, student


def config(steps: int, cache_teacher: bool = False) -> TrainConfig:
    return TrainConfig(epochs=10_000, max_steps=steps, batch_size=BATCH, lr=0.01, progress=False, trackers="none",
                       log_every=50, cache_teacher=cache_teacher)


def run_trainer(data: ArrayDataset, steps: int, cache_teacher: bool = False) -> float:
    """Seconds of the training loop; with the teacher cache, its one-off caching pass is included."""
    teacher, student = models()
    d = HintonKD(student, teacher, KDParams(), TaskInfo(10, len(data), (40,)))
    t0 = time.perf_counter()
    trainer = Trainer(d, data, config(steps, cache_teacher), seed=0)
    t = time.perf_counter() if not cache_teacher else t0
    trainer.fit()
    return time.perf_counter() - t


def run_plain(data: ArrayDataset, steps: int) -> float:
    teacher, student = models()
    p = KDParams()
    cfg = config(steps)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    batches = EpochBatches(len(data), BATCH, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(cfg, steps, batches.per_epoch))
    t = time.perf_counter()
    step, epoch = 0, 0
    while step < steps:
        for idx in batches.epoch(epoch):
            batch = data.__getitems__(idx)
            s = student(batch["x"])
            with torch.no_grad():
                tl = teacher(batch["x"])
            loss = p.ce_weight * labeled_ce(s, batch) + p.kd_weight * kd_loss(s, tl, p.temperature)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
        epoch += 1
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(N, 40, generator=g), torch.randint(0, 10, (N,), generator=g))
    run_plain(data, 20), run_trainer(data, 20)  # warm-up
    plain, engine, cached = [], [], []
    for _ in range(args.repeats):
        plain.append(run_plain(data, args.steps))
        engine.append(run_trainer(data, args.steps))
        cached.append(run_trainer(data, args.steps, cache_teacher=True))
    tp, te, tc = (statistics.median(v) for v in (plain, engine, cached))
    print(f"plain loop                 : {args.steps / tp:8.1f} steps/s  (median of {args.repeats})")
    print(f"Trainer                    : {args.steps / te:8.1f} steps/s")
    print(f"Trainer, teacher cache on  : {args.steps / tc:8.1f} steps/s  (default; includes the caching pass)")
    print(f"ratio: {te / tp:.2f}")


if __name__ == "__main__":
    main()
