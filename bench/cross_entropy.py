"""Micro-benchmark: the LM head + logit_scale + cross-entropy, forward + backward.

Compares, in one process and on the same random inputs:
  eager     F.cross_entropy(F.linear(h, W).float() * scale, y)       (what HF eager runs)
  compiled  the same function under torch.compile (Inductor)            (what HF + compile runs)
  fused     cohere_compile.linear_cross_entropy (chunked Triton kernel; never holds [tokens, vocab])
for an LM head that is trained (full fine-tuning; tied embedding) and frozen (LoRA).
Reports median ms, peak memory above the inputs, and ratios; writes JSON to bench/results/.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/cross_entropy.py             # Aya: B4 x 1024, 4096, 256000, bf16
    PYTHONPATH=$PWD python bench/cross_entropy.py --tiny --device cpu             # smoke test without a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import call_times_ms, sync, write_json  # noqa: E402

import cohere_compile as cc  # noqa: E402


def unfused_loss(h, w, y, scale: float):
    return F.cross_entropy((F.linear(h, w) * scale).float(), y, ignore_index=-100)


def make_inputs(tokens, hidden, vocab, dtype, device, weight_grad, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) * 1.0).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device, dtype).requires_grad_(weight_grad)
    y = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    y[:: 17] = -100  # some ignored positions, as padding gives
    return h, w, y


def time_ms(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(call_times_ms(fn, device, repeats))


def peak_mb(fn, device):
    """Peak allocated memory during one call, above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_variant(name, loss_fn, h, w, y, scale, device, warmup, repeats):
    def step():
        h.grad = None
        w.grad = None
        loss = loss_fn(h, w, y, scale)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    loss = step()
    sync(device)
    first_s = time.perf_counter() - t0
    grads = (h.grad.detach().clone(), w.grad.detach().clone() if w.grad is not None else None)
    result = {
        "first_call_s": first_s,
        "median_ms": time_ms(step, device, warmup, repeats),
        "peak_mb": peak_mb(step, device),
        "loss": loss.item(),
    }
    return result, grads


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--scale", type=float, default=0.125, help="logit_scale (Aya 8B: 0.125)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--heads", default="trained,frozen", help="LM-head cases: trained (full FT), frozen (LoRA)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="B1 x 64 tokens, hidden 64, vocab 4096 (smoke test)")
    p.add_argument("--out", default=None, help="JSON file name in bench/results/")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.seq, args.hidden, args.vocab, args.repeats, args.warmup = 1, 64, 64, 4096, 3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu (and --tiny) for a smoke test")
    if args.device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("TRITON_INTERPRET=1 is set: unset it (TRITON_INTERPRET=0) to time the compiled Triton kernel")
    dtype = getattr(torch, args.dtype)
    tokens = args.batch * args.seq
    compiled = torch.compile(unfused_loss)
    variants = {"eager": unfused_loss, "compiled": compiled, "fused": cc.linear_cross_entropy}

    results = {}
    for head in [x for x in args.heads.split(",") if x]:
        h, w, y = make_inputs(tokens, args.hidden, args.vocab, dtype, args.device, weight_grad=(head == "trained"))
        rows, ref_grads = {}, None
        for name, fn in variants.items():
            rows[name], grads = run_variant(name, fn, h, w, y, args.scale, args.device, args.warmup, args.repeats)
            if ref_grads is None:
                ref_grads = grads
            else:
                rows[name]["grad_h_rel_err_vs_eager"] = rel(grads[0], ref_grads[0])
                if grads[1] is not None:
                    rows[name]["grad_w_rel_err_vs_eager"] = rel(grads[1], ref_grads[1])
        for name in rows:
            rows[name]["speedup_vs_compiled"] = rows["compiled"]["median_ms"] / rows[name]["median_ms"]
            if rows[name]["peak_mb"] is not None:
                rows[name]["peak_vs_compiled"] = rows[name]["peak_mb"] / rows["compiled"]["peak_mb"]
        results[head] = rows
        del h, w, y

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    payload = {"config": {**vars(args), "tokens": tokens}, "environment": env, "results": results}
    name = args.out or f"cross_entropy_{'tiny_' if args.tiny else ''}{args.device}_T{tokens}_V{args.vocab}.json"
    path = write_json(name, payload)

    print(f"LM head + logit_scale + cross-entropy, fwd+bwd: {tokens} tokens, hidden {args.hidden}, "
          f"vocab {args.vocab}, {args.dtype}, {args.device}")
    print(f"{'head':<9}{'variant':<10}{'median ms':>11}{'peak MB':>10}{'x compiled':>12}{'mem/compiled':>14}"
          f"{'first s':>9}{'loss':>10}{'grad_h err':>12}")
    for head, rows in results.items():
        for name, r in rows.items():
            peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
            mem = f"{r['peak_vs_compiled']:.2f}" if r.get("peak_vs_compiled") is not None else "-"
            err = f"{r['grad_h_rel_err_vs_eager']:.1e}" if "grad_h_rel_err_vs_eager" in r else "-"
            print(f"{head:<9}{name:<10}{r['median_ms']:>11.2f}{peak:>10}{r['speedup_vs_compiled']:>12.2f}{mem:>14}"
                  f"{r['first_call_s']:>9.1f}{r['loss']:>10.4f}{err:>12}")
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
