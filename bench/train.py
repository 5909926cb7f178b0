"""LoRA fine-tuning step: HF eager vs HF + torch.compile vs cc.optimize, in one run.

LoRA r=16 (alpha 32, dropout 0) on all seven linears (q, k, v, o, gate, up, down) of
every layer, random bf16 weights with the real shapes (bench/common.py SHAPES), B x T
random tokens, labels = inputs, AdamW, ``use_cache=False``. For each peer, in this order
and with the previous model freed first: first step time (includes compilation), median
step time over the steps after the warm-up -> tokens/s, peak memory
(``torch.cuda.max_memory_allocated``, reset before the model is built, so weights count).

FLOP floor (per token, at 750 TFLOP/s bf16): N = weights of every matmul a token passes
(7 linears x layers + the tied LM head), T = sequence length, L = layers, Hq = heads*head_dim,
    forward 2N + backward activation-gradient 2N (frozen weights: no weight-gradient)
    + LoRA 6 r (in + out) per adapted linear (forward, activation and weight gradients)
    + causal attention 3 x 2 Hq T L (forward QK^T and PV over T/2 keys on average, backward 2x)
    + with gradient checkpointing the layers' forward again (2 N_layers + 2 Hq T L).

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/train.py --layers 4             # quick (~3 min)
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/train.py                        # Aya-8B, 32 layers
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/train.py --gradient-checkpointing
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/train.py --shape command-r-plus --layers 8
    PYTHONPATH=$PWD python bench/train.py --tiny --device cpu --steps 3 --warmup 1  # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import SHAPES, build_model, environment, kernel_summary, write_json  # noqa: E402
from cohere_compile.train import LORA_TARGETS, add_lora, compile_model, token_batches, train  # noqa: E402

PEAK_TFLOPS = 750.0
PEERS = {
    "eager": "HF eager (sdpa)",
    "torch_compile": "HF + torch.compile",
    "cc": "cc.optimize (regional)",
    "cc_rewrites": "cc.optimize (regional, training rewrites + fused loss)",
    "cc_whole": "cc.optimize (whole model)",
}
DEFAULT_LAYERS = {"command-r-plus": 8}  # 64 layers (104B parameters) do not fit one GPU
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, use_qk_norm=True, logit_scale=0.0625)


def build(shape: dict, layers: int | None, device: str, dtype: torch.dtype):
    return build_model(shape, layers, dtype=dtype, device=device, bos_token_id=1, eos_token_id=2, use_cache=False)


def flop_floor(cfg, seq: int, r: int, checkpointing: bool) -> dict:
    h, inter, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hq = cfg.num_attention_heads * (h // cfg.num_attention_heads)
    hkv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [(h, hq), (h, hkv), (h, hkv), (hq, h), (h, inter), (h, inter), (inter, h)]  # (in, out), LORA_TARGETS order
    n_layers = L * sum(i * o for i, o in shapes)
    n = n_layers + V * h
    lora = L * sum(6 * r * (i + o) for i, o in shapes)
    attn_fwd = 2 * hq * seq * L
    per_token = 4 * n + lora + 3 * attn_fwd + ((2 * n_layers + attn_fwd) if checkpointing else 0)
    return {"matmul_params": n, "flops_per_token": per_token,
            "floor_tokens_per_s": PEAK_TFLOPS * 1e12 / per_token, "peak_tflops": PEAK_TFLOPS}


def _free():
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


PROFILED_STEPS = 2


def profile_steps(model, batches, device: str) -> dict:
    """Where a step's time goes: torch.profiler over PROFILED_STEPS more steps (after one unrecorded
    step that sets up a fresh optimizer's state), CUDA kernel time per step by family and kernel."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=0, active=PROFILED_STEPS)) as prof:
        result = train(model, batches, 1 + PROFILED_STEPS, lr=1e-4, progress=False, device=device, on_step=prof.step)
    summary = kernel_summary(prof, per=PROFILED_STEPS)
    summary["profiled_step_ms"] = [1e3 * s for s in result.step_s[1:]]  # under the profiler's overhead
    return summary


def print_profile(profile: dict, median_step_ms: float) -> None:
    busy = profile["kernel_ms"] / median_step_ms
    print(f"  kernels {profile['kernel_ms']:.1f} ms per step of {median_step_ms:.1f} ms ({busy:.0%} busy): "
          + ", ".join(f"{f} {ms:.1f}" for f, ms in profile["families_ms"].items()), flush=True)
    for k in profile["top_kernels"][:12]:
        print(f"    {k['us'] / 1e3:7.2f} ms  {k['calls']:6.0f}x  {k['kernel']}")


def run_peer(peer: str, args, shape: dict, device: str) -> dict:
    _free()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, args.layers, device, torch.bfloat16 if device == "cuda" else torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)  # same LoRA init for every peer
    model = add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    # For every peer: layer 0's input then needs a gradient like the others, so regional
    # compiles one layer graph, not two (costs layer 0's input gradient, ~1/(2L) of the backward).
    model.enable_input_require_grads()
    how = {"eager": "none", "torch_compile": "torch", "cc": "cc", "cc_rewrites": "cc", "cc_whole": "cc"}[peer]
    passes = args.passes
    if peer == "cc_rewrites" and passes is None:  # the training rewrites with the fused loss on top
        from cohere_compile.passes import DEFAULT_PASSES

        passes = [*DEFAULT_PASSES, "linear_cross_entropy"]
    model = compile_model(model, how, regional=peer in ("cc", "cc_rewrites"), passes=passes,
                          training_rewrites=peer == "cc_rewrites",
                          activation_memory_budget=args.activation_memory_budget if how == "cc" else None)
    batches = [b.to(device) for b in token_batches(model.config.vocab_size, args.batch, args.seq, n_batches=4, seed=2)]
    torch._dynamo.utils.counters.clear()
    t0 = time.perf_counter()
    from cohere_compile.passes import recording

    # caches off for every peer: first steps are cold compiles (as on a fresh machine), and the
    # pass manager reports the rewrites of each compiled graph (a cache hit would report none)
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        result = train(model, batches, args.warmup + args.steps, lr=1e-4, progress=False, device=device)
    wall = time.perf_counter() - t0
    profile = profile_steps(model, batches, device) if args.profile else None
    out = {
        "peer": PEERS[peer],
        "first_step_s": result.first_step_s,
        "median_step_ms": 1e3 * sorted(result.step_s[args.warmup:])[len(result.step_s[args.warmup:]) // 2],
        "tokens_per_s": result.tokens_per_s(warmup=args.warmup),
        "losses": result.losses,
        "step_s": result.step_s,
        "wall_s": wall,
        # graphs Dynamo compiled (regional: layer graphs + final norm + head, independent of depth)
        "dynamo_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        "rewrites": rewrites,
    }
    if profile is not None:
        out["profile"] = profile
        print_profile(profile, out["median_step_ms"])
    if device == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model, batches, result
    _free()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="aya-8b")
    parser.add_argument("--tiny", action="store_true", help="a tiny Cohere config (CPU smoke run)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: the shape's; 8 for command-r-plus)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=["eager", "torch_compile", "cc", "cc_rewrites"])
    parser.add_argument("--passes", nargs="*", default=None,
                        help="cc passes (default: DEFAULT_PASSES; cc_rewrites adds linear_cross_entropy)")
    parser.add_argument("--activation-memory-budget", type=float, default=None,
                        help="cc peers: cc.optimize(activation_memory_budget=...) (default: PyTorch's own)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, profile 2 more: CUDA kernel time per step by family / kernel")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--name", default=None, help="JSON file name under bench/results/")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny --device cpu for a smoke run")
    shape = TINY if args.tiny else SHAPES[args.shape]
    label = "tiny" if args.tiny else args.shape
    args.layers = args.layers or (None if args.tiny else DEFAULT_LAYERS.get(args.shape))
    layers = args.layers or shape["num_hidden_layers"]
    if args.tiny and args.seq == 1024:
        args.seq = 32

    from transformers import CohereConfig

    cfg = CohereConfig(**{**shape, "num_hidden_layers": layers}, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    floor = flop_floor(cfg, args.seq, args.lora_r, args.gradient_checkpointing)
    results = {}
    for peer in args.peers:
        print(f"--- {PEERS[peer]} ...", flush=True)
        try:
            results[peer] = run_peer(peer, args, shape, args.device)
        except Exception as exc:  # keep the other peers' numbers; the error is in the JSON and on stderr
            traceback.print_exc()
            results[peer] = {"peer": PEERS[peer], "error": f"{type(exc).__name__}: {exc}"}
            _free()

    base = results.get("eager", {}).get("tokens_per_s")
    print(f"\nLoRA r{args.lora_r} all linears, {label} x {layers} layers, B{args.batch} x {args.seq}, AdamW, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; floor "
          f"{floor['floor_tokens_per_s']:,.0f} tok/s ({floor['flops_per_token'] / 1e9:.2f} GFLOP/token)")
    print(f"{'peer':<28}{'tok/s':>10}{'vs eager':>10}{'of floor':>10}{'peak GB':>10}{'1st step s':>12}{'graphs':>8}"
          f"{'loss0':>9}")
    for r in results.values():
        if "error" in r:
            print(f"{r['peer']:<28}  ERROR {r['error'][:80]}")
            continue
        tps = r["tokens_per_s"]
        r["fraction_of_floor"] = tps / floor["floor_tokens_per_s"]
        r["vs_eager"] = tps / base if base else None
        print(f"{r['peer']:<28}{tps:>10,.0f}{(r['vs_eager'] or float('nan')):>9.2f}x{r['fraction_of_floor']:>9.1%}"
              f"{r.get('peak_memory_gb', float('nan')):>10.1f}{r['first_step_s']:>12.1f}{r['dynamo_graphs']:>8}"
              f"{r['losses'][0]:>9.4f}")

    env = environment() if args.device == "cuda" else {
        "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    payload = {"bench": "train", "shape": label, "layers": layers, "batch": args.batch, "seq": args.seq,
               "lora_r": args.lora_r, "lora_targets": list(LORA_TARGETS), "optimizer": "AdamW",
               "gradient_checkpointing": args.gradient_checkpointing, "warmup": args.warmup, "steps": args.steps,
               "passes": args.passes, "activation_memory_budget": args.activation_memory_budget, "floor": floor,
               "results": results, "env": env}
    tag = ("_gc" if args.gradient_checkpointing else "") + \
        (f"_amb{args.activation_memory_budget:g}" if args.activation_memory_budget is not None else "")
    path = write_json(args.name or f"train_{label}_L{layers}_B{args.batch}x{args.seq}{tag}.json", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
