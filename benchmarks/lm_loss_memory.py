"""Peak memory and time of the fused (chunked) token divergence against materialized logits.

Forward KL and generalized JSD (β = 0.5) at B·T = 8192 tokens (8 × 1024), V = 32768, hidden 1024,
float32 on the CPU, forward + backward (gradients w.r.t. the hidden states and the lm_head weight):

- ``fused``: ``distill.lm.losses.fused_token_divergence`` (chunk 1024 tokens);
- ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss`` (β = 0 for forward KL) on ``logits = hidden @ W.T``
  (install with ``pip install -e .[bench]``; without TRL a faithful copy of its formula is used and
  the output says so);
- ``plain``: plain PyTorch on materialized logits (``log_softmax``, then the KL / JSD formula).

Each variant runs in its own fresh Python process; its peak memory is the peak RSS during the
forward + backward minus the RSS once the inputs (hidden, weight, teacher logits, labels) are
allocated and the libraries imported, i.e. the extra memory the loss needs. The peak is the kernel's
``VmHWM``, reset to the current RSS just before the measured step (``/proc/self/clear_refs``);
where that is not allowed, ``ru_maxrss`` (the inputs are allocated in place so the baseline is
their size). The causal shift
and a 64-token prompt mask per sequence apply to every variant. Last line: ``ratio: X.XX`` = fused
peak memory / TRL peak memory (forward KL and JSD together: the larger of the two ratios; target
≤ 0.25; time target ≤ 1.0× TRL).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lm_loss_memory.py [--tokens 8192] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SEQ = 1024
PROMPT = 64


def _trl_loss():
    """TRL's own ``GKDTrainer.generalized_jsd_loss`` (install with ``pip install -e ".[bench]"``)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:  # TRL before GKD moved to trl.experimental
            from trl import GKDTrainer
    except ImportError as err:
        raise SystemExit(f"this benchmark compares with TRL, which is not importable ({err}); "
                         'install it with: pip install -e ".[bench]"') from None
    return GKDTrainer.generalized_jsd_loss, "trl " + __import__("trl").__version__


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_kib() -> int:
    try:
        return _status_kib("VmRSS")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _reset_peak.done = True
    except OSError:
        _reset_peak.done = False
    return _reset_peak.done


def worker(variant: str, kind: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    import resource
    import time

    import torch
    import torch.nn.functional as F

    from distill.lm.losses import fused_token_divergence

    trl_fn, trl_name = _trl_loss()
    torch.manual_seed(0)
    batch = tokens // SEQ
    h = torch.randn(batch, SEQ, hidden).requires_grad_()
    w = torch.randn(vocab, hidden).div_(hidden**0.5).requires_grad_()  # in place: no transient copies
    teacher = torch.randn(batch, SEQ, vocab).mul_(2.0)
    labels = torch.randint(0, vocab, (batch, SEQ))
    labels[:, :PROMPT] = -100
    beta = 0.0 if kind == "forward_kl" else 0.5
    base = _rss_kib()
    if not _reset_peak():  # cannot reset the kernel's high-water mark: peak since start (inputs in place)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    if variant == "fused":
        loss = fused_token_divergence(h, w, teacher, labels, kind=kind, beta=beta, chunk_size=chunk)
    elif variant == "trl":
        logits = h @ w.T
        loss = trl_fn(logits[:, :-1], teacher[:, :-1], labels=labels[:, 1:], beta=beta)
    elif variant == "plain":
        logits = h @ w.T
        ls = F.log_softmax(logits[:, :-1], dim=-1)
        lt = F.log_softmax(teacher[:, :-1], dim=-1)
        if kind == "forward_kl":
            per = (lt.exp() * (lt - ls)).sum(-1)
        else:
            lm = torch.logaddexp(lt + torch.log(torch.tensor(beta)), ls + torch.log1p(torch.tensor(-beta)))
            per = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
        mask = labels[:, 1:] != -100
        loss = (per * mask).sum() / mask.sum()
    else:
        raise ValueError(variant)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if _reset_peak.done else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "kind": kind, "loss": loss.item(), "seconds": seconds,
            "peak_mib": (peak - base) / 1024, "grad_norm": float(w.grad.norm() + h.grad.norm()), "trl": trl_name}


def run_variant(variant: str, kind: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--kind", kind, "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--kind", default="forward_kl")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.kind, args.tokens, args.vocab, args.hidden, args.chunk_size)))
        return

    print(f"B·T = {args.tokens} tokens ({args.tokens // SEQ} × {SEQ}), V = {args.vocab}, hidden = {args.hidden}, "
          f"float32, CPU, {os.environ.get('OMP_NUM_THREADS', 'default')} threads, fused chunk = {args.chunk_size}")
    ratios, time_ratios = [], []
    for kind in ("forward_kl", "jsd"):
        res = {v: run_variant(v, kind, args) for v in ("fused", "trl", "plain")}
        label = "forward KL (TRL β = 0)" if kind == "forward_kl" else "JSD β = 0.5"
        print(f"\n{label}   [TRL: {res['trl']['trl']}]")
        print(f"  {'variant':<8}{'peak MiB':>10}{'time s':>9}{'loss':>12}{'|grad|':>12}")
        for v, r in res.items():
            print(f"  {v:<8}{r['peak_mib']:>10.0f}{r['seconds']:>9.2f}{r['loss']:>12.6f}{r['grad_norm']:>12.6f}")
        mem = res["fused"]["peak_mib"] / res["trl"]["peak_mib"]
        tim = res["fused"]["seconds"] / res["trl"]["seconds"]
        ratios.append(mem)
        time_ratios.append(tim)
        print(f"  fused / trl: memory {mem:.3f}, time {tim:.2f}; fused / plain: memory "
              f"{res['fused']['peak_mib'] / res['plain']['peak_mib']:.3f}, time "
              f"{res['fused']['seconds'] / res['plain']['seconds']:.2f}")
    print(f"\nmax time ratio (fused / trl): {max(time_ratios):.2f}")
    print(f"ratio: {max(ratios):.2f}")


if __name__ == "__main__":
    main()
