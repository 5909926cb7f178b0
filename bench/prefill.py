"""Prefill benchmark: HF eager vs HF + torch.compile vs cohere_compile, in one run.

    python bench/prefill.py --shape aya-8b --batches 1 4 --seq 2048
    python bench/prefill.py --shape aya-8b --layers 4 --ablation     # per-pass on/off

Workload: forward over B x T random tokens, logits for the last position only
(``logits_to_keep=1``), bf16, random weights. Floor: matmul FLOPs at the measured
bf16 rate (``--tflops``, default 750 for the H200 here).
"""

from __future__ import annotations

import argparse
import gc

import torch

import cohere_compile as cc
from cohere_compile.backend import make_backend
from cohere_compile.colocate import ensure_colocated
from common import build_model, cuda_time_ms, environment, first_call_s, kernel_summary, write_json


def matmul_flops(cfg, batch: int, seq: int) -> float:
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    linear = 2 * batch * seq * L * (h * (h + 2 * kv) + h * h + 3 * h * i)
    attn_causal = 2 * batch * L * cfg.num_attention_heads * seq * seq * hd  # QK^T + PV, causal half
    head = 2 * batch * h * cfg.vocab_size
    return linear + attn_causal + head


def profile_call(call) -> dict:
    """Kernel time of one call by family and the top kernels, in ms (torch.profiler, after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    summary = kernel_summary(prof, per=1, top=25)
    summary["top_kernels"] = [{"kernel": k["kernel"], "ms": k["us"] / 1e3, "calls": k["calls"]}
                              for k in summary["top_kernels"]]
    families = ", ".join(f"{f} {ms:.2f}" for f, ms in summary["families_ms"].items())
    print(f"    kernels {summary['kernel_ms']:.2f} ms: {families}", flush=True)
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="aya-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tflops", type=float, default=750.0)
    ap.add_argument("--ablation", action="store_true", help="also time each pass switched off / alone")
    ap.add_argument("--try", dest="try_sets", action="append", default=[],
                    help="extra pass set to time, comma separated (e.g. swiglu,attention); repeatable. The item "
                         "+merged computes q/k/v/gate/up as one matmul per layer (merge_projections, as cc.generate "
                         "does; the weights are co-located first, which the other variants then read as row slices)")
    ap.add_argument("--no-all", action="store_true", help="skip the all-passes variant")
    ap.add_argument("--tag", default="")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one call per variant with torch.profiler: kernel time by family and the top "
                         "kernels (where the time beyond the matmuls goes)")
    args = ap.parse_args()

    # Every variant compiles the same code with its own backend: lift Dynamo's
    # recompile limit so none of them silently falls back to eager.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    model = build_model(args.shape, args.layers)
    cfg = model.config
    variants = {
        "hf_eager": model,
        "hf_torch_compile": torch.compile(model),
        "cohere_compile": torch.compile(model, backend=make_backend()),
    }
    if not args.no_all:
        variants["cohere_all_passes"] = torch.compile(model, backend=make_backend({"passes": list(cc.PASS_NAMES)}))
    for spec in args.try_sets:
        items = [p for p in spec.split(",") if p]
        chosen = [p for p in items if p != "+merged"]
        merged = "+merged" in items
        if merged:
            ensure_colocated(model)  # same values, one buffer per layer's five projections
        backend = make_backend({"passes": chosen, "merge_projections": merged})
        variants["cohere_" + "+".join(chosen) + ("+merged" if merged else "")] = torch.compile(model, backend=backend)
    if args.ablation:
        variants["cohere_no_passes"] = torch.compile(model, backend=make_backend({"passes": []}))
        for p in cc.PASS_NAMES:
            rest = [q for q in cc.PASS_NAMES if q != p]
            variants[f"cohere_without_{p}"] = torch.compile(model, backend=make_backend({"passes": rest}))
            variants[f"cohere_only_{p}"] = torch.compile(model, backend=make_backend({"passes": [p]}))

    layers = cfg.num_hidden_layers
    json_name = f"prefill_{args.shape}_L{layers}{'_ablation' if args.ablation else ''}{args.tag}.json"
    results = []
    for batch in args.batches:
        ids = torch.randint(10, cfg.vocab_size, (batch, args.seq), device="cuda")
        floor_ms = matmul_flops(cfg, batch, args.seq) / (args.tflops * 1e12) * 1e3
        ref = None
        for name, fn in variants.items():
            with torch.no_grad():
                call = lambda: fn(ids, logits_to_keep=1).logits  # noqa: E731
                first = first_call_s(call)
                out = call().float()
                timing = cuda_time_ms(call, repeats=args.repeats)
            if ref is None:
                ref = out
            elif name != "hf_eager" and first < 0.5:
                raise RuntimeError(f"{name}: first call took {first:.2f}s: it was not compiled (recompile limit?)")
            rel = ((out - ref).norm() / ref.norm()).item()
            row = {"variant": name, "batch": batch, "seq": args.seq, "first_call_s": first, **timing,
                   "rel_err_vs_eager": rel, "floor_ms": floor_ms, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
            if args.profile:
                row["profile"] = profile_call(call)
            results.append(row)
            # after every variant: a run cut short by the device's time limit keeps what it measured
            write_json(json_name, {"env": environment(), "args": vars(args), "results": results})
            print(f"B{batch} x {args.seq} {name:<34} {timing['median_ms']:8.2f} ms  first {first:6.1f}s  "
                  f"rel_err {rel:.2e}  floor {floor_ms:.1f} ms", flush=True)
            gc.collect()
        base = {r["variant"]: r["median_ms"] for r in results if r["batch"] == batch}
        print(f"  speedup vs torch.compile: {base['hf_torch_compile'] / base['cohere_compile']:.3f}x; "
              f"vs eager: {base['hf_eager'] / base['cohere_compile']:.3f}x; "
              f"ours / floor: {base['cohere_compile'] / floor_ms:.2f}", flush=True)

    print("wrote", write_json(json_name, {"env": environment(), "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
