"""4-bit benchmarks: int4 decode vs bf16 decode, and QLoRA (NF4) training vs bf16 LoRA.

Decode (batch --batch, default 1): the same loop for both, the strongest plain one we know:
HF ``StaticCache`` + ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``,
one token a step with ``cache_position``; the prompt is prefilled eagerly. The int4 model is
``cohere_compile.quant.quantize_model(model, "int4")`` (torchao tinygemm, groups of 128, untied
int4 LM head). Floor: bytes read per step (weights without the embedding table + the KV cache
up to the mean position) / 4.09 TB/s.

Training (B --train-batch x --train-seq, AdamW on LoRA r16 of all seven linears, peft):
bf16 LoRA vs QLoRA (NF4 base weights), both under plain ``torch.compile``, gradient
checkpointing as --gc says; tokens/s (median step) and peak memory.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/quant.py                    # Aya-8B shapes, 32 layers
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/quant.py --layers 4 --skip-train
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/quant.py --layers 4 --skip-train \
        --variants bf16_generate,int4_generate,int4_triton_generate             # our int4 GEMV vs tinygemm
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/quant.py --layers 32 --skip-train \
        --variants bf16_generate,int4_gemlite_generate                          # gemlite (carry its wheel)
    PYTHONPATH=$PWD python bench/quant.py --tiny --device cpu --no-compile        # smoke test on CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import SHAPES, build_model, write_json  # noqa: E402

HBM_BYTES_PER_S = 4.09e12  # H200 device copy, measured (DESIGN.md)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, use_qk_norm=False, logit_scale=0.125)
# int4_cohere: + our default passes (cc backend); *_generate: cc.optimize + cc.generate (our
# paged cache and CUDA-graph decode step), decode steps only; int4_triton_generate: the same with
# cc.optimize(..., int4_kernel="triton") (our int4 GEMV instead of torchao's tinygemm);
# (on CUDA cc.generate runs each layer's five co-located int4 projections as one GEMV);
# int4_triton_unmerged_generate: the same with merge_projections=False (five GEMVs per layer);
# int4_triton_inductor_pdl_generate: our kernels launch without PDL (custom_op_pdl=False);
# int4_triton_unfused_generate: without passes/int4_split_k.py (down's split-K sums and SwiGLU
# as their own kernels, as before 2026-12-04);
# int4_gemlite_generate: int4_kernel="gemlite" (torchao's gemlite-backed tensors; needs gemlite)
DECODE_VARIANTS = ("bf16", "int4", "int4_cohere", "bf16_generate", "int4_generate", "int4_triton_generate",
                   "int4_triton_unmerged_generate", "int4_triton_inductor_pdl_generate", "int4_triton_unfused_generate",
                   "int4_gemlite_generate")
INT4_KERNEL_OF = {"int4_triton_generate": "triton", "int4_triton_unmerged_generate": "triton",
                  "int4_triton_inductor_pdl_generate": "triton", "int4_triton_unfused_generate": "triton",
                  "int4_gemlite_generate": "gemlite"}  # others: torchao
# *_cohere: cc.optimize(regional, training rewrites, + fused loss) instead of plain torch.compile
TRAIN_VARIANTS = ("bf16_lora", "qlora_nf4", "qlora_nf4_cohere")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args) -> torch.nn.Module:
    shape = TINY if args.tiny else args.shape
    vocab = (TINY if args.tiny else SHAPES[args.shape])["vocab_size"]
    return build_model(shape, args.layers, device=args.device, eos_token_id=min(255001, vocab - 1))


def isolated(args, label: str, run) -> dict:
    """One variant's results, or its error: a failing variant must not lose the others'
    numbers. Its model is freed (and compiled code dropped) before the next one is built."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001
        print(f"{label} FAILED: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        torch._dynamo.reset()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really occupies (the inner tensors of a torchao subclass)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, n)) for n in names)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row).
    Buffers count too (Int4TritonLinear keeps its packed weights, scales and zeros there)."""
    embed = model.get_input_embeddings().weight
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += embed.shape[1] * embed.element_size() if p is embed else tensor_bytes(p)
    if getattr(model.get_output_embeddings(), "weight", None) is embed:  # tied head: the table is read as the head
        total += tensor_bytes(embed)
    return total


class Timer:
    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.s = time.perf_counter() - self.t


def cohere_cudagraph_backend():
    """Our passes (the defaults of cc.optimize) plus Inductor's CUDA graphs, i.e. what
    mode="reduce-overhead" adds for the inductor backend (torch.compile ignores mode for others)."""
    from torch._inductor.compile_fx import compile_fx

    from cohere_compile.passes import DEFAULT_PASSES, CoherePassManager

    manager = CoherePassManager(DEFAULT_PASSES)

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches={"joint_custom_post_pass": manager,
                                                              "triton.cudagraphs": True})

    return backend


def decode_result(model, args, step_ms_runs: list[float], first_run_s: float, tokens: torch.Tensor) -> dict:
    """One decode variant's numbers: median step against the floor (weights read per step +
    the KV cache at the mean position, at HBM_BYTES_PER_S), and the tokens' head."""
    B, P, N = args.batch, args.prompt, args.new_tokens
    step_s = statistics.median(step_ms_runs) / 1e3
    cfg = model.config
    kv_bytes = (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
                * (P + N / 2) * B * 2)
    w_bytes = weight_bytes_per_token(model)
    floor_s = (w_bytes + kv_bytes) / HBM_BYTES_PER_S
    return {
        "tokens_per_s": B / step_s, "step_ms": step_s * 1e3, "first_run_s": first_run_s, "step_ms_runs": step_ms_runs,
        "weight_gb_per_step": w_bytes / 1e9, "kv_gb_per_step": kv_bytes / 1e9,
        "floor_tokens_per_s": B / floor_s, "fraction_of_floor": floor_s / step_s,
        "pad_only": bool((tokens == cfg.pad_token_id).all()), "tokens_head": tokens[0, :8].tolist(),
    }


def decode(model, args, cohere: bool = False) -> dict:
    from transformers import StaticCache

    B, P, N = args.batch, args.prompt, args.new_tokens
    cache = StaticCache(config=model.config, max_cache_len=P + N)
    forward = model.forward
    if args.compile and cohere:
        forward = torch.compile(model.forward, backend=cohere_cudagraph_backend(), fullgraph=True)
    elif args.compile:
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, model.config.vocab_size, (B, P), generator=g).to(args.device)

    def run() -> tuple[float, torch.Tensor]:
        cache.reset()
        pos = torch.arange(P, device=args.device)
        with torch.no_grad():
            logits = model(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
            out = [tok]
            with Timer(args.device) as t:
                for i in range(N - 1):
                    pos = torch.tensor([P + i], device=args.device)
                    logits = forward(input_ids=tok, past_key_values=cache, cache_position=pos,
                                     position_ids=pos.expand(B, 1), use_cache=True).logits
                    tok = logits[:, -1:].argmax(-1).clone()  # clone: the cudagraph output buffer is reused
                    out.append(tok)
        return t.s, torch.cat(out, 1)

    with Timer(args.device) as first:
        run()
    times, tokens = [], None
    for _ in range(args.repeats):
        s, tokens = run()
        times.append(s)
    return decode_result(model, args, [t / (N - 1) * 1e3 for t in times], first.s, tokens)


def decode_generate(model, args, **generate_kwargs) -> dict:
    """cc.generate on the already-optimized model: median decode-step time (prefill excluded),
    then, with ``--prefill-prompt`` > 0, the median prefill of one prompt that long (one new token)."""
    import cohere_compile as cc

    B, P, N = args.batch, args.prompt, args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, model.config.vocab_size, (P,), generator=g) for _ in range(B)]
    with Timer(args.device) as first:
        cc.generate(model, prompts, N, stop_tokens=(), **generate_kwargs)
    step_ms, tokens = [], None
    for _ in range(args.repeats):
        stats = {}
        tokens = torch.tensor(cc.generate(model, prompts, N, stop_tokens=(), stats=stats, **generate_kwargs))
        step_ms.append(1e3 * stats["decode_s"] / stats["decode_steps"])
    result = decode_result(model, args, step_ms, first.s, tokens)
    if args.prefill_prompt:
        long_prompt = [torch.randint(10, model.config.vocab_size, (args.prefill_prompt,), generator=g)]
        prefill_ms = []
        for _ in range(1 + args.repeats):  # the first call is a warm-up
            stats = {}
            cc.generate(model, long_prompt, 1, stop_tokens=(), stats=stats, **generate_kwargs)
            prefill_ms.append(1e3 * stats["prefill_s"])
        result.update(prefill_prompt=args.prefill_prompt, prefill_ms=statistics.median(prefill_ms[1:]),
                      prefill_ms_runs=prefill_ms)
    return result


def bench_decode(args, results: dict | None = None, save=lambda: None) -> dict:
    from cohere_compile.quant import quantize_model

    results = {} if results is None else results
    variants = args.variants.split(",") if args.variants else [v for v in DECODE_VARIANTS if args.cohere or v != "int4_cohere"]
    for variant in variants:
        def run(variant=variant):
            model = build(args)
            if variant.endswith("_generate"):
                import cohere_compile as cc

                quantize = "int4" if variant.startswith("int4") else None
                kernel = INT4_KERNEL_OF.get(variant, "torchao")
                if kernel == "gemlite":
                    model.half()  # torchao's gemlite tensors compute in fp16 (same bytes as bf16)
                extra = {"merge_projections": False} if "unmerged" in variant else {}
                if "inductor_pdl" in variant:
                    extra["custom_op_pdl"] = False
                if "unfused" in variant:
                    extra["inductor_options"] = {"int4_split_k": False}
                r = decode_generate(cc.optimize(model, quantize=quantize, group_size=args.group_size,
                                                int4_kernel=kernel), args, **extra)
                print(f"decode {variant}: {r['tokens_per_s']:.1f} tok/s", flush=True)
                return r
            if variant.startswith("int4"):
                quantize_model(model, "int4", group_size=args.group_size)
            r = decode(model, args, cohere=variant.endswith("_cohere"))
            print(f"decode {variant}: {r['tokens_per_s']:.1f} tok/s", flush=True)
            return r

        results[variant] = isolated(args, f"decode {variant}", run)
        save()  # a run cut short by a time limit keeps the variants done so far
    if all("tokens_per_s" in results.get(v, {}) for v in ("bf16", "int4")):
        results["int4_vs_bf16"] = results["int4"]["tokens_per_s"] / results["bf16"]["tokens_per_s"]
    if all("tokens_per_s" in results.get(v, {}) for v in ("bf16_generate", "int4_generate")):
        results["int4_vs_bf16_generate"] = (results["int4_generate"]["tokens_per_s"]
                                            / results["bf16_generate"]["tokens_per_s"])
    for variant in INT4_KERNEL_OF:
        if all("tokens_per_s" in results.get(v, {}) for v in ("bf16_generate", variant)):
            results[f"{variant.removesuffix('_generate')}_vs_bf16_generate"] = (
                results[variant]["tokens_per_s"] / results["bf16_generate"]["tokens_per_s"])
    return results


def train(model, args, cohere: bool = False) -> dict:
    """``cohere``: cc.optimize (regional, training rewrites, default passes + the fused loss)
    instead of plain torch.compile."""
    import cohere_compile as cc
    from cohere_compile.passes import DEFAULT_PASSES

    model = cc.FastCohereModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=LORA_TARGETS,
                                              use_gradient_checkpointing=args.gc)
    if args.compile and cohere:
        step_fn = cc.optimize(model, regional=True, training_rewrites=True,
                              passes=[*DEFAULT_PASSES, "linear_cross_entropy"])
    else:
        step_fn = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, model.config.vocab_size, (args.train_batch, args.train_seq), generator=g).to(args.device)

    def step():
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with Timer(args.device) as first:
        step()
    times = []
    for _ in range(args.train_steps):
        with Timer(args.device) as t:
            loss = step()
        times.append(t.s)
    s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 1e9 if args.device.startswith("cuda") else None
    return {"tokens_per_s": args.train_batch * args.train_seq / s, "step_ms": s * 1e3, "first_step_s": first.s,
            "peak_gb": peak, "loss": loss.item(), "step_ms_runs": [t * 1e3 for t in times]}


def bench_train(args, results: dict, save) -> dict:
    from cohere_compile.quant import quantize_model

    variants = args.train_variants.split(",") if args.train_variants else TRAIN_VARIANTS
    unknown = set(variants) - set(TRAIN_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown train variant(s) {sorted(unknown)}; choose from {TRAIN_VARIANTS}")
    for variant in variants:
        def run(variant=variant):
            model = build(args)
            if variant.startswith("qlora_nf4"):
                quantize_model(model, "nf4")
            r = train(model, args, cohere=variant.endswith("_cohere"))
            print(f"train {variant}: {r['tokens_per_s']:.0f} tok/s, peak {r['peak_gb']} GB", flush=True)
            return r

        results[variant] = isolated(args, f"train {variant}", run)
        save()  # each variant's numbers survive a later one running out of time
    if all("tokens_per_s" in results.get(v, {}) for v in ("bf16_lora", "qlora_nf4")):
        results["qlora_vs_lora_speed"] = results["qlora_nf4"]["tokens_per_s"] / results["bf16_lora"]["tokens_per_s"]
    return results


def table(res: dict) -> str:
    lines = []
    if "decode" in res:
        d = res["decode"]
        lines += ["| decode B{} | tok/s | ms/step | weights GB/step | floor tok/s | of floor | prefill ms |".format(
                      res["args"]["batch"]), "| --- | --- | --- | --- | --- | --- | --- |"]
        for v in [v for v in DECODE_VARIANTS if v in d]:
            r = d[v]
            if "error" in r:
                lines.append(f"| {v} | FAILED: {r['error'][:80]} |")
                continue
            prefill = f"{r['prefill_ms']:.1f} ({r['prefill_prompt']} tokens)" if "prefill_ms" in r else "-"
            lines.append(f"| {v} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} | {r['weight_gb_per_step']:.2f} | "
                         f"{r['floor_tokens_per_s']:.1f} | {r['fraction_of_floor']:.2f} | {prefill} |")
        if "int4_vs_bf16" in d:
            lines.append(f"int4 / bf16 = {d['int4_vs_bf16']:.2f}x (goal >= 2.2x), StaticCache loop")
        if "int4_vs_bf16_generate" in d:
            lines.append(f"int4 / bf16 = {d['int4_vs_bf16_generate']:.2f}x (goal >= 2.2x), cc.generate")
        if "int4_triton_vs_bf16_generate" in d:
            lines.append(f"int4 (our Triton GEMV) / bf16 = {d['int4_triton_vs_bf16_generate']:.2f}x (goal >= 2.2x), "
                         f"cc.generate")
        if "int4_triton_unmerged_vs_bf16_generate" in d:
            lines.append(f"int4 (our Triton GEMV, five GEMVs per layer) / bf16 = "
                         f"{d['int4_triton_unmerged_vs_bf16_generate']:.2f}x, cc.generate")
        if "int4_gemlite_vs_bf16_generate" in d:
            lines.append(f"int4 (gemlite) / bf16 = {d['int4_gemlite_vs_bf16_generate']:.2f}x (goal >= 2.2x), "
                         f"cc.generate")
    if "train" in res:
        t = res["train"]
        a = res["args"]
        lines += ["", f"| LoRA r16, B{a['train_batch']} x {a['train_seq']}, gc={a['gc']} | tok/s | ms/step | "
                      "peak GB | first step s |", "| --- | --- | --- | --- | --- |"]
        for v in [v for v in TRAIN_VARIANTS if v in t]:
            r = t[v]
            if "error" in r:
                lines.append(f"| {v} | FAILED: {r['error'][:80]} |")
                continue
            peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
            lines.append(f"| {v} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {peak} | {r['first_step_s']:.1f} |")
        if "qlora_vs_lora_speed" in t:
            lines.append(f"QLoRA / LoRA speed = {t['qlora_vs_lora_speed']:.2f}x (goal: QLoRA peak <= 14 GB)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="aya-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the full model)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--prefill-prompt", type=int, default=512,
                    help="cc.generate variants: also time the prefill of one prompt this long (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=1024)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--gc", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing")
    ap.add_argument("--cohere", action=argparse.BooleanOptionalAction, default=True,
                    help="also decode int4 through our backend (default passes) with CUDA graphs")
    ap.add_argument("--variants", default=None, help=f"comma-separated decode variants (default: all of {DECODE_VARIANTS})")
    ap.add_argument("--train-variants", default=None,
                    help=f"comma-separated training variants (default: all of {TRAIN_VARIANTS})")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out", default=None, help="JSON name in bench/results/")
    args = ap.parse_args(argv)

    res = {"args": vars(args)}
    if args.device.startswith("cuda"):
        from bench.common import environment

        res["environment"] = environment()
    name = args.out or f"quant_{'tiny' if args.tiny else args.shape}_L{args.layers or 'all'}_{args.device.split(':')[0]}.json"
    if not args.skip_decode:
        res["decode"] = {}
        bench_decode(args, res["decode"], save=lambda: write_json(name, res))
    if not args.skip_train:
        res["train"] = {}
        bench_train(args, res["train"], save=lambda: write_json(name, res))
    print(table(res))
    print("wrote", write_json(name, res))
    return res


if __name__ == "__main__":
    main()
