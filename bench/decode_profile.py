"""Where a decode step's time goes: a probe for the next optimisation, not a peer comparison.

Two parts, each optional (GPU only):
- ``--gemm``: the 7 weight matmuls of every layer (Aya-8B shapes, distinct weights per layer so
  nothing stays in L2), cuBLAS inside one CUDA graph, as separate calls and with q/k/v and
  gate/up merged into one matmul each; at the batch sizes of ``--gemm-m``. It bounds what a
  projection-merging pass could save.
- ``--variants``: a torch.profiler trace of whole calls, per generated token: wall time, the sum of
  CUDA kernel time (wall minus that = the GPU waiting on the host), and the top kernels.
  bench/decode.py's ``ours`` / ``ours_frozen`` / ``ours_combo`` / ``ours_unmerged``, and ``int4``
  (``cc.optimize(quantize="int4")``), ``int4_triton`` (``int4_kernel="triton"``) and
  ``int4_triton_inductor_pdl`` (that, our kernels without PDL) run ``cc.generate``; ``hf_paged`` /
  ``hf_dynamic`` run ``model.generate`` after ``cc.optimize(model, paged_cache=True / False)``.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/decode_profile.py --layers 32 --gemm \\
        --variants ours,int4
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/decode_profile.py --layers 16 --variants hf_paged,hf_dynamic

Measured 2026-11-29 on the H200 with an earlier form of this script:
``bench/results/probes/decode_profile_b1_h200.json``.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

import cohere_compile as cc
from bench.common import SHAPES, build_model, cuda_graph_time_s, environment, kernel_summary, write_json
from bench.decode import OUR_VARIANTS

# cc.generate variants -> its keyword arguments: bench/decode.py's, and the int4 ones (quantized in
# prepared(): torchao's tinygemm, or int4_kernel="triton" for the int4_triton* ones)
GENERATE_VARIANTS = {**OUR_VARIANTS, "int4": {}, "int4_triton": {},
                     "int4_triton_inductor_pdl": {"custom_op_pdl": False}}
HF_VARIANTS = ("hf_paged", "hf_dynamic")


def gemm_probe(shape: dict, layers: int, m: int) -> dict:
    """ms per step of every layer's projections: separate vs q/k/v and gate/up merged."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, x_inter = torch.randn(m, h, **bf16), torch.randn(m, inter, **bf16)
    qkv = [torch.randn(h + 2 * kv, h, **bf16) for _ in range(layers)]
    gate_up = [torch.randn(2 * inter, h, **bf16) for _ in range(layers)]
    o = [torch.randn(h, h, **bf16) for _ in range(layers)]
    down = [torch.randn(h, inter, **bf16) for _ in range(layers)]

    def separate():
        for i in range(layers):
            for w in (qkv[i][:h], qkv[i][h:h + kv], qkv[i][h + kv:], gate_up[i][:inter], gate_up[i][inter:], o[i]):
                x @ w.t()
            x_inter @ down[i].t()

    def merged():
        for i in range(layers):
            x @ qkv[i].t(), x @ gate_up[i].t(), x @ o[i].t(), x_inter @ down[i].t()

    nbytes = 2 * layers * (qkv[0].numel() + gate_up[0].numel() + o[0].numel() + down[0].numel())
    result = {"m": m, "weight_gb": nbytes / 1e9}
    for name, fn in (("separate", separate), ("merged", merged)):
        s = cuda_graph_time_s(fn, calls=1)
        result[f"{name}_ms"], result[f"{name}_tb_s"] = 1e3 * s, nbytes / s / 1e12
    del qkv, gate_up, o, down
    torch.cuda.empty_cache()
    return result


def prepared(variant: str, model):
    """The model as the variant uses it, and a call producing ``n`` new tokens for ``prompt``."""
    if variant in GENERATE_VARIANTS:
        int4 = variant.startswith("int4")
        cc.optimize(model, quantize="int4" if int4 else None,
                    int4_kernel="triton" if variant.startswith("int4_triton") else "torchao")
        kwargs = GENERATE_VARIANTS[variant]
        return lambda prompt, n: cc.generate(model, [prompt], n, stop_tokens=(), **kwargs)
    cc.optimize(model, paged_cache=variant == "hf_paged")

    def call(prompt, n):
        ids = torch.tensor([prompt], device=model.device)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
    return call


def profile_variant(variant: str, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model = build_model(args.shape, args.layers)
    call = prepared(variant, model)
    prompt = list(range(100, 100 + args.prompt))
    start = time.perf_counter()
    call(prompt, 8)  # compiles
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    call(prompt, args.new_tokens)  # warm (CUDA graphs recorded, caches sized)
    torch.cuda.synchronize()
    start = time.perf_counter()
    call(prompt, args.new_tokens)
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - start) / args.new_tokens
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call(prompt, args.new_tokens)
        torch.cuda.synchronize()
    summary = kernel_summary(prof, per=args.new_tokens, top=args.top)
    kernels_ms = summary["kernel_ms"]
    top = [{"kernel": k["kernel"], "us_per_token": k["us"], "calls_per_token": k["calls"]} for k in summary["top_kernels"]]
    graph_launches = sum(e.name == "cudaGraphLaunch" for e in prof.events())
    result = {"compile_s": compile_s, "wall_ms_per_token": wall_ms, "kernel_ms_per_token": kernels_ms,
              "gpu_busy": kernels_ms / wall_ms, "cuda_graph_launches_per_token": graph_launches / args.new_tokens,
              "families_ms_per_token": summary["families_ms"], "top_kernels": top}
    print(f"{variant}: {wall_ms:.2f} ms/token wall, {kernels_ms:.2f} ms of kernels ({kernels_ms / wall_ms:.0%} busy), "
          f"compile {compile_s:.0f} s", flush=True)
    for row in top[:15]:
        print(f"  {row['us_per_token']:8.1f} us  {row['calls_per_token']:5.1f}x  {row['kernel']}")
    del model, call
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="aya-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--gemm", action="store_true", help="run the projection GEMM probe")
    ap.add_argument("--gemm-m", default="1,32", help="comma-separated batch sizes of the GEMM probe")
    ap.add_argument("--variants", default="", help=f"comma-separated, of {(*GENERATE_VARIANTS, *HF_VARIANTS)}")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=30, help="kernels kept per variant")
    ap.add_argument("--name", default=None, help="JSON name under bench/results/")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - {*GENERATE_VARIANTS, *HF_VARIANTS}
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {(*GENERATE_VARIANTS, *HF_VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile.py profiles CUDA kernels; it needs a GPU")
    name = args.name or f"decode_profile_{args.shape}_L{args.layers}.json"
    results = {"env": environment(), "args": vars(args), "gemm": [], "variants": {}}
    if args.gemm:
        for m in (int(v) for v in args.gemm_m.split(",")):
            results["gemm"].append(gemm_probe(SHAPES[args.shape], args.layers, m))
            print("gemm", results["gemm"][-1], flush=True)
            write_json(name, results)
    for variant in variants:
        try:
            results["variants"][variant] = profile_variant(variant, args)
        except Exception as e:  # noqa: BLE001  (one failing variant must not lose the others)
            print(f"{variant} FAILED: {type(e).__name__}: {e}", flush=True)
            results["variants"][variant] = {"error": f"{type(e).__name__}: {e}"}
        write_json(name, results)
    print("wrote", write_json(name, results))


if __name__ == "__main__":
    main()
