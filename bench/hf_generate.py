"""Plain HF ``model.generate`` after ``cc.optimize``: the paged KV cache (``paged_cache=True``, opt-in)
against HF's DynamicCache (the default), eager HF, and ``cc.generate`` for reference.

Variants, all in one run on one model (Aya-8B shapes, random bf16 weights, greedy, every
sequence runs the full ``--new-tokens``; a left-padded batch when ``--batch`` > 1, prompt
lengths spread over ``--prompt/2 .. --prompt``):
- ``hf_eager``: the un-optimized model's ``generate`` (DynamicCache).
- ``cc_paged``: ``cc.optimize(model, paged_cache=True)``, then ``model.generate`` (the paged cache).
- ``cc_dynamic``: ``cc.optimize(model)``, then ``model.generate`` (HF's DynamicCache, the default).
- ``cc_generate``: ``cc.generate`` (continuous batching, CUDA-graph decode): the fast path.
Each variant gets a fresh model (same weights) and a fresh Dynamo cache; its batch sizes run
in the order given, as one user's successive calls would.

tokens/s = generated tokens / wall time of the call (prefill included), median of
``--repeats`` calls after a warm-up call (which compiles). Also reported: the cache type each
variant ended with, Dynamo graphs compiled during its warm-up, and token agreement with
``hf_eager`` (bf16: compiled kernels round differently, so greedy streams may part late).

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/hf_generate.py --layers 4 --batch 1,8
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/hf_generate.py --layers 32 --batch 1 --repeats 2
    PYTHONPATH=$PWD python bench/hf_generate.py --tiny --device cpu     # a CPU smoke run of the script
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch._dynamo.utils import counters

import cohere_compile as cc
from bench.common import SHAPES, build_model, environment, write_json
from bench.decode import left_pad, make_prompts, timed

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, use_qk_norm=False, logit_scale=0.125)


def hf_call(model, prompts, new_tokens, seen: dict):
    ids, mask = left_pad(prompts, model.device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    seen["cache"] = type(out.past_key_values).__name__
    return out.sequences[:, ids.shape[1]:]


def prepare(variant, model):
    """The model as a user of this variant would hold it, and the call to time."""
    if variant == "cc_paged":
        cc.optimize(model, paged_cache=True)
    elif variant == "cc_dynamic":
        cc.optimize(model)
    elif variant == "cc_generate":  # as bench/decode.py runs it: cc.generate compiles its own step
        return lambda prompts, new_tokens, seen: (seen.__setitem__("cache", "PagedKVCache"), torch.tensor(
            cc.generate(model, prompts, new_tokens, stop_tokens=())))[1]
    elif variant != "hf_eager":
        raise ValueError(f"unknown variant {variant}")
    return lambda prompts, new_tokens, seen: hf_call(model, prompts, new_tokens, seen)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="aya-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, run in this order, e.g. 1,8")
    ap.add_argument("--prompt", type=int, default=512, help="longest prompt; others spread down to half")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--variants", default="hf_eager,cc_paged,cc_dynamic,cc_generate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tag", default="")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short requests: a smoke run of this script")
    args = ap.parse_args()
    if args.tiny:
        args.prompt, args.new_tokens, args.repeats = 12, 5, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --tiny --device cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batch.split(",")]

    results = {"env": environment() if device.type == "cuda" else {"device": "cpu"}, "args": vars(args),
               "workloads": {f"B{b}": {"variants": {}} for b in batches}}
    outputs = {b: {} for b in batches}
    for variant in args.variants.split(","):
        # each variant on a fresh model (same seed, same weights) and a fresh Dynamo cache, so
        # one variant's compiled entries do not count against another's recompile limit
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = build_model(TINY if args.tiny else args.shape, None if args.tiny else args.layers, dtype=dtype,
                            device=device)
        try:
            call = prepare(variant, model)
        except Exception as e:
            call = None
            failure = {"error": f"{type(e).__name__}: {e}"[:500]}
        for batch in batches:  # in order: a user's later calls see the earlier calls' compiled graphs
            lengths = [args.prompt - i * args.prompt // (2 * batch) for i in range(batch)]
            prompts = make_prompts(lengths, model.config.vocab_size)
            row = results["workloads"][f"B{batch}"]
            row["prompt_lengths"], row["new_tokens"] = lengths, args.new_tokens
            seen = {}
            try:
                if call is None:
                    raise RuntimeError(failure["error"])
                graphs = counters["stats"]["unique_graphs"]
                with torch.no_grad():
                    seconds = timed(lambda: outputs[batch].__setitem__(  # noqa: B023
                        variant, call(prompts, args.new_tokens, seen)), device, args.repeats)
                entry = {"seconds": seconds, "tok_s": batch * args.new_tokens / seconds, "cache": seen.get("cache"),
                         "dynamo_graphs": counters["stats"]["unique_graphs"] - graphs}
            except Exception as e:  # a variant that fails is reported, not fatal
                entry = {"error": f"{type(e).__name__}: {e}"[:500]}
            row["variants"][variant] = entry
            print(f"B{batch}", variant, entry, flush=True)
        del model, call
    for batch in batches:
        if "hf_eager" in outputs[batch]:
            ref = outputs[batch]["hf_eager"].to("cpu")
            results["workloads"][f"B{batch}"]["agreement_with_hf_eager"] = {
                v: float((o.to("cpu")[:, : ref.shape[1]] == ref).float().mean()) for v, o in outputs[batch].items()}

    print(f"\n{'workload':<9}{'variant':<13}{'tok/s':>10}{'vs eager':>10}{'vs cc_dynamic':>15}{'graphs':>8}"
          f"{'agree':>8}  cache")
    for name, row in results["workloads"].items():
        v = row["variants"]
        base = {k: v.get(k, {}).get("tok_s") for k in ("hf_eager", "cc_dynamic")}
        for variant, e in v.items():
            if "tok_s" not in e:
                print(f"{name:<9}{variant:<13}  {e['error'][:100]}")
                continue
            ratios = [f"{e['tok_s'] / base[k]:.2f}x" if base[k] else "-" for k in ("hf_eager", "cc_dynamic")]
            agree = row.get("agreement_with_hf_eager", {}).get(variant)
            agree = f"{agree:.0%}" if agree is not None else "-"
            print(f"{name:<9}{variant:<13}{e['tok_s']:>10.1f}{ratios[0]:>10}{ratios[1]:>15}{e['dynamo_graphs']:>8}"
                  f"{agree:>8}  {e['cache']}")
    if not args.tiny:
        layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
        path = write_json(f"hf_generate_{args.shape}_L{layers}{args.tag}.json", results)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
