"""The offline sparse teacher cache: bytes stored per token at k = 64, and lm_kd training throughput
from the cache against a live teacher 8× the student's parameter count (catalogue B4).

Task: ``pytext`` (CPython reference-manual prose, byte-level BPE, vocabulary 2048, blocks of 64
tokens, every token after the first supervised). Student and teacher are ``tiny_causal_lm`` Llamas;
the teacher's width and depth are picked so that its parameter count is closest to 8× the student's
(the printed ratio is the one measured). ``distill.lm.cache.write_cache`` caches the teacher's top-k
over the first ``(warmup + steps) · batch_size`` training blocks; then the same student (same
initialisation, same batches, AdamW) trains ``lm_kd`` (forward KL) for ``warmup + steps`` optimizer steps
from the cache (``sparse_token_divergence``, tail bucket) and from the live teacher (its forward under
inference mode each step, ``token_divergence``). Throughput = input tokens (attention mask) of the
measured steps / their wall time (forward, loss, backward, optimizer step; batches are built
outside the timer for both). Storage target: ≤ 6·k + 16 bytes per token (int32 ids, 16-bit
log-probs and a float32 tail: 6k + 4, plus each shard's offsets and header). Last line:
``ratio: X.XX`` = cache throughput / live throughput. The two students step in turn, batch by batch,
so a busy machine slows both alike. Both models are freshly initialised: a near-uniform teacher keeps
little of its mass in its top 64 of 2048 tokens, so the printed kd losses (cache vs live) differ by
design here and only show that both train; the comparison is of speed and storage.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/teacher_cache.py [--steps 100] [--top-k 64] [--batch-size 16]

(On a machine others are using, more threads than free cores make OpenMP spin: several times slower.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch


def pick_teacher(target: float, vocab: int) -> tuple[int, int]:
    """(hidden, layers) of the ``tiny_causal_lm`` whose parameter count is closest to ``target``: untied
    embeddings and lm_head ``2·V·h``, per layer attention ``4h²`` + MLP ``3·h·4h`` + two norms, final norm."""
    best = None
    for layers in (1, 2, 3, 4):
        for hidden in range(32, 1025, 32):
            n = 2 * vocab * hidden + hidden + layers * (16 * hidden * hidden + 2 * hidden)
            if best is None or abs(n - target) < abs(best[0] - target):
                best = (n, hidden, layers)
    return best[1], best[2]


class Variant:
    """One student trained by ``lm_kd`` (its own AdamW), timed step by step."""

    def __init__(self, distiller, lr: float) -> None:
        self.d = distiller
        self.opt = torch.optim.AdamW([p for p in distiller.student.parameters() if p.requires_grad], lr=lr)
        self.tokens, self.seconds, self.losses = 0, 0.0, []
        distiller.student.train()

    def step(self, batch: dict, measured: bool) -> None:
        batch = dict(batch, num_items=torch.tensor(float(self.d.count_items(batch))))
        t0 = time.perf_counter()
        out = self.d.training_step(batch)
        out.losses["student"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.losses.append(float(out.metrics["kd"]))
        if measured:
            self.tokens += int(batch["attention_mask"].sum())
            self.seconds += dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100, help="measured optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--teacher-ratio", type=float, default=8.0, help="teacher parameters / student parameters")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    from distill.lm.cache import TeacherCache, write_cache
    from distill.lm.methods.lm_kd import LMKD, LMKDParams
    from distill.lm.models import count_params
    from distill.lm.data.task import TokenDataset
    from distill.lm.data.tasks import PyTextParams, build_pytext_task
    from distill.lm.data.text import tiny_causal_lm

    torch.manual_seed(0)
    full = build_pytext_task(PyTextParams(block_size=args.block_size, vocab_size=args.vocab))
    n = (args.warmup + args.steps) * args.batch_size
    if n > len(full.train):
        raise SystemExit(f"{n} training blocks needed, the task has {len(full.train)}; lower --steps or --batch-size")
    data = dataclasses.replace(full, train=TokenDataset(full.train.examples[:n], full.train.pad_id))
    tok, vocab = data.tokenizer, data.vocab

    def student():
        return tiny_causal_lm(None, args.student_hidden, args.student_layers, 4, tok, seed=1)

    n_student = count_params(student())
    t_hidden, t_layers = pick_teacher(args.teacher_ratio * n_student, vocab)
    teacher = tiny_causal_lm(None, t_hidden, t_layers, 4, tok, seed=0).eval()
    n_teacher = count_params(teacher)
    threads = torch.get_num_threads()
    print(f"pytext: V = {vocab}, blocks of {args.block_size} tokens, {n} training blocks, batch {args.batch_size}, "
          f"CPU, {threads} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"student: hidden {args.student_hidden}, {args.student_layers} layers, {n_student:,} params; teacher: "
          f"hidden {t_hidden}, {t_layers} layers, {n_teacher:,} params ({n_teacher / n_student:.2f}x)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"
        t0 = time.perf_counter()
        write_cache(teacher, data, folder, top_k=args.top_k, dtype=args.dtype, batch_size=args.batch_size,
                    progress=False)
        write_s = time.perf_counter() - t0
        cache = TeacherCache.open(folder, data)
        m = cache.manifest
        bpt = cache.bytes_per_token()
        index_bytes = (folder / "index.safetensors").stat().st_size
        print(f"\ncache: top-{args.top_k} {args.dtype}, {m['rows']:,} tokens in {len(m['shards'])} shard(s), "
              f"written in {write_s:.1f} s ({m['rows'] / write_s:,.0f} tokens/s)")
        print(f"  bytes per token: {bpt:.2f} (payload 6k + 4 = {6 * args.top_k + 4}; target 6k + 16 = "
              f"{6 * args.top_k + 16}); index {index_bytes / n:.1f} bytes per sample more")
        print(f"  dense float32 logits would be {4 * vocab} bytes per token ({4 * vocab / bpt:.1f}x)")

        batches = list(data.train.batches(args.batch_size))
        params = LMKDParams(kind="forward_kl")
        runs = {}
        for variant in ("cache", "live"):
            info = data.task_info(False)
            if variant == "cache":
                info.teacher_cache = cache
            runs[variant] = Variant(LMKD(student(), teacher if variant == "live" else None, params, info), args.lr)
        # interleaved step by step (order alternating), so a shared machine's load hits both alike
        for j, batch in enumerate(batches):
            for variant in (("cache", "live") if j % 2 == 0 else ("live", "cache")):
                runs[variant].step(batch, measured=j >= args.warmup)
        rates = {}
        for variant, r in runs.items():
            rates[variant] = r.tokens / r.seconds
            print(f"  {variant:<6} {rates[variant]:>10,.0f} tokens/s ({args.steps} steps, {r.seconds:.1f} s); "
                  f"kd loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}")
    ratio = rates["cache"] / rates["live"]
    print(f"\nratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
