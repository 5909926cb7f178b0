"""Decode throughput: cc.generate over the paged KV cache vs three Hugging Face peers.

Workloads (Aya-8B shapes, random bf16 weights, greedy, every sequence runs the full
``--new-tokens``):
- ``b1``: one prompt of ``--b1-prompt`` tokens.
- ``ragged``: ``--ragged`` prompts with lengths spread evenly over ``--min-len..--max-len``.

Peers, all in the same run:
- ``hf_eager``: ``model.generate`` with its DynamicCache (left-padded batch).
- ``hf_static``: ``model.generate(cache_implementation="static")`` (HF compiles the step).
- ``loop``: HF ``StaticCache`` + ``torch.compile(model.forward, mode="reduce-overhead",
  fullgraph=True)``, one token per call: the strongest plain-PyTorch loop.
- ``ours``: ``cc.generate`` (paged cache, continuous batching, our passes, CUDA graph, and on
  CUDA merged projections: its defaults).
- ``ours_frozen``: the same with Inductor freezing (not in the default peer list).
- ``ours_combo``: the same with Inductor combo kernels (not in the default peer list).
- ``ours_unmerged``: the same with ``merge_projections=False`` (not in the default peer list).
- ``ours_no_swiglu``: the same without the swiglu pass in generate's graphs (only paged_attention),
  so Inductor can fuse silu(gate) * up into the down projection's GEMV (not in the default list).
- ``ours_no_pdl``: without Inductor's Programmatic Dependent Launch (on by default in the CUDA
  decode graph since 2026-12-03); ``ours_pdl`` turns it on in the prefill graph too;
  ``ours_autotune``: Inductor's GEMM autotuning (``max_autotune_gemm``); none is in the default list.
- ``ours_rope_write``: swiglu + qk_norm_rope, so each layer's RoPE (and QK norm) and its k/v cache
  write are one kernel (``cohere::qk_norm_rope_kv_write``). Since 2026-12-02 that is also
  ``cc.generate``'s own CUDA default, so on the GPU it runs the same graphs as ``ours``.

tokens/s = generated tokens / wall time of the whole call (prefill included), after a
warm-up call. For ours we also report decode-only tokens/s (prefill excluded). The
floor is bytes read per decode step (all weights once + the KV cache of every
sequence at its average length) / the measured copy bandwidth.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/decode.py --layers 32
    python bench/decode.py --tiny   # a CPU smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import cohere_compile as cc
from bench.common import (SHAPES, build_model, copy_bandwidth_gbs, cuda_graph_time_s, environment,
                          paged_attention_inputs, sync, write_json)


# cc.generate variants -> its keyword arguments. ``ours_frozen``: Inductor
# freezing, which treats weights as constants, so its concat-linear pattern can merge the
# q/k/v and gate/up matmuls that share an input into one GEMV each (copies of those weights).
# On the H200 (2026-11-29, B1 Aya-8B) it ran 71 tok/s against 196 without: an experiment, not a default.
# ``ours_combo``: Inductor's combo kernels (independent kernels, e.g. the q/k/v GEMVs, share one
# launch; not yet measured on the GPU). ``ours_unmerged``: merge_projections=False, i.e. separate
# q/k/v/gate/up matmuls; merged (the default on CUDA since 2026-11-29) decoded 8-9% faster on the
# H200 (decode_aya-8b_L32_{b1,ragged}_merged.json, where "ours_merged" is today's "ours").
OUR_VARIANTS = {"ours": {}, "ours_frozen": {"inductor_options": {"freezing": True}},
                "ours_combo": {"inductor_options": {"combo_kernels": True}},
                "ours_unmerged": {"merge_projections": False},
                "ours_no_swiglu": {"passes": []},
                "ours_rope_write": {"passes": ["swiglu", "qk_norm_rope"]},
                # Programmatic Dependent Launch: each kernel's launch overlaps the tail of the kernel
                # before it (Hopper). The CUDA decode default for Inductor's kernels and ours (custom
                # ops, kernels/pdl.py), so "ours_no_pdl" opts out of both, "ours_inductor_pdl" keeps
                # it for Inductor's kernels only (the default of 2026-12-03), and "ours_pdl" (user
                # inductor_options reach both graphs) adds PDL to the prefill graph's Inductor kernels
                "ours_pdl": {"inductor_options": {"triton.enable_pdl": True}},
                "ours_no_pdl": {"inductor_options": {"triton.enable_pdl": False}},
                "ours_inductor_pdl": {"custom_op_pdl": False},
                # Inductor autotunes its matmuls against Triton templates (decode at batch > 1: the
                # projections are cuBLAS calls otherwise; at batch 1 they are GEMV reductions anyway)
                "ours_autotune": {"inductor_options": {"max_autotune_gemm": True}}}


def make_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (n,), generator=g) for n in lengths]


def left_pad(prompts, device):
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = p
        mask[i, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


def hf_generate(model, prompts, new_tokens, **kw):
    ids, mask = left_pad(prompts, model.device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def make_loop(model, batch, max_len):
    """StaticCache + reduce-overhead compiled forward, one token per call."""
    from transformers import StaticCache

    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def run(prompts, new_tokens):
        ids, mask2d = left_pad(prompts, model.device)
        n = ids.shape[1]
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        full_mask = torch.zeros(len(prompts), max_len, dtype=torch.long, device=model.device)
        full_mask[:, :n] = mask2d
        full_mask[:, n:] = 1  # future positions: the causal mask hides them until written
        pos = (mask2d.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            next_pos = pos[:, -1:] + 1
            tokens = [token]
            for _ in range(new_tokens - 1):
                out = step(input_ids=token, attention_mask=full_mask, position_ids=next_pos, past_key_values=cache,
                           use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True).clone()
                next_pos = next_pos + 1
                tokens.append(token)
        return torch.cat(tokens, 1)

    return run


def timed(fn, device, repeats, warm_up=True):
    if warm_up:
        fn()  # compiles, records CUDA graphs
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours_entry(stats, seconds, total_new, floor) -> dict:
    """A cc.generate timing: whole call and decode steps only (each prompt's first token comes
    from its prefill, so decode steps made total_new - prefills tokens)."""
    decode_only = (total_new - stats["prefills"]) / stats["decode_s"]
    return {"seconds": seconds, "tok_s": total_new / seconds, "decode_only_tok_s": decode_only,
            "decode_only_fraction_of_floor": decode_only / floor, "stats": dict(stats),
            "decode_ms_per_step": 1e3 * stats["decode_s"] / stats["decode_steps"]}


def floor_tokens_per_s(model, lengths, new_tokens, bandwidth_gbs):
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2
    avg_len = sum(lengths) / len(lengths) + new_tokens / 2
    step_bytes = weight_bytes + len(lengths) * avg_len * kv_per_token
    return len(lengths) / (step_bytes / (bandwidth_gbs * 1e9)), weight_bytes, step_bytes


def kernel_bandwidth(model, lengths, bandwidth_gbs, device):
    """One layer's paged_attention alone: achieved GB/s of the K/V bytes it must read."""
    cfg = model.config
    args, kv_bytes = paged_attention_inputs(lengths, cfg.num_key_value_heads, cfg.num_attention_heads,
                                            cfg.hidden_size // cfg.num_attention_heads, device, bool_mask=True)
    fn = lambda: torch.ops.cohere.paged_attention(*args)  # noqa: E731
    t = cuda_graph_time_s(fn)  # as it runs inside the decode step: no launch overhead
    return {"median_us": t * 1e6, "kv_bytes": kv_bytes, "gbs": kv_bytes / t / 1e9,
            "fraction_of_copy": kv_bytes / t / 1e9 / bandwidth_gbs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="aya-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--b1-prompt", type=int, default=512)
    ap.add_argument("--ragged", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=2000)
    ap.add_argument("--peers", default="hf_eager,hf_static,loop,ours")
    ap.add_argument("--workloads", default="b1,ragged")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time our variants this many times, interleaved (round r runs every variant once more; "
                         "the compiled graphs are reused), and report each variant's median over the rounds: "
                         "order and drift effects between variants then average out")
    ap.add_argument("--tag", default="")
    ap.add_argument("--tiny", action="store_true", help="tiny CPU model: a smoke run of this script")
    args = ap.parse_args()

    if args.tiny:
        from transformers import CohereConfig, CohereForCausalLM

        cfg = CohereConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)
        model = CohereForCausalLM(cfg).eval()
        args.new_tokens, args.b1_prompt, args.ragged, args.min_len, args.max_len = 6, 9, 3, 5, 20
        args.repeats = 1
        args.peers = args.peers.replace("hf_static,", "").replace("loop,", "")  # CPU: no cudagraphs
    else:
        model = build_model(args.shape, args.layers)
    device = model.device
    bandwidth = copy_bandwidth_gbs(device)
    workloads = {
        "b1": [args.b1_prompt],
        "ragged": [round(args.min_len + i * (args.max_len - args.min_len) / max(1, args.ragged - 1))
                   for i in range(args.ragged)],
    }
    results = {"env": environment() if device.type == "cuda" else {"device": "cpu"}, "args": vars(args),
               "copy_bandwidth_gbs": bandwidth, "workloads": {}}
    layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    json_name = None if args.tiny else f"decode_{args.shape}_L{layers}{args.tag}.json"
    for name in args.workloads.split(","):
        lengths = workloads[name]
        prompts = make_prompts(lengths, model.config.vocab_size)
        total_new = len(prompts) * args.new_tokens
        floor, weight_bytes, step_bytes = floor_tokens_per_s(model, lengths, args.new_tokens, bandwidth)
        row = {"prompt_lengths": lengths, "new_tokens": args.new_tokens, "floor_tok_s": floor,
               "weight_bytes": weight_bytes, "bytes_per_step": step_bytes, "peers": {}}
        outputs, ours_fns = {}, {}
        for peer in args.peers.split(","):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                if peer == "hf_eager":
                    fn = lambda: outputs.__setitem__(peer, hf_generate(model, prompts, args.new_tokens))  # noqa: E731
                elif peer == "hf_static":
                    fn = lambda: outputs.__setitem__(  # noqa: E731
                        peer, hf_generate(model, prompts, args.new_tokens, cache_implementation="static"))
                elif peer == "loop":
                    loop = make_loop(model, len(prompts), max(lengths) + args.new_tokens + 8)
                    fn = lambda: outputs.__setitem__(peer, loop(prompts, args.new_tokens))  # noqa: E731
                elif peer in OUR_VARIANTS:
                    stats = {}
                    # bound as defaults: --rounds calls these again after the loop has moved on
                    fn = lambda peer=peer, stats=stats: outputs.__setitem__(peer, torch.tensor(cc.generate(  # noqa: E731
                        model, prompts, args.new_tokens, stop_tokens=(), stats=stats, **OUR_VARIANTS[peer])))
                else:
                    raise ValueError(f"unknown peer {peer}")
                with torch.no_grad():
                    start = time.perf_counter()
                    seconds = timed(fn, device, args.repeats)
                    total_s = time.perf_counter() - start
                entry = {"seconds": seconds, "first_call_and_timed_s": total_s, "tok_s": total_new / seconds, "fraction_of_floor": total_new / seconds / floor}
                if peer in OUR_VARIANTS:
                    entry.update(ours_entry(stats, seconds, total_new, floor))
                    ours_fns[peer] = (fn, stats)
            except Exception as e:  # a peer that fails is reported, not fatal
                entry = {"error": f"{type(e).__name__}: {e}"[:500]}
            row["peers"][peer] = entry
            results["workloads"][name] = row
            if json_name:  # after every peer: a run cut off by the call limit keeps its numbers
                write_json(json_name, results)
            print(name, peer, {k: v for k, v in entry.items() if k != "stats"}, flush=True)
        for r in range(1, args.rounds):  # the variants again, in the same order, already compiled
            for peer, (fn, stats) in ours_fns.items():
                with torch.no_grad():
                    seconds = timed(fn, device, args.repeats, warm_up=False)
                row["peers"][peer].setdefault("rounds", [ours_entry(row["peers"][peer]["stats"], row["peers"][peer]["seconds"], total_new, floor)])
                row["peers"][peer]["rounds"].append(ours_entry(stats, seconds, total_new, floor))
                print(name, peer, "round", r, {k: v for k, v in row["peers"][peer]["rounds"][-1].items() if k != "stats"},
                      flush=True)
        for peer in ours_fns:
            entry = row["peers"][peer]
            if "rounds" in entry:  # the headline numbers become the medians over the rounds
                for key in ("tok_s", "decode_only_tok_s", "decode_ms_per_step"):
                    entry[key] = statistics.median(r[key] for r in entry["rounds"])
                entry["fraction_of_floor"] = entry["tok_s"] / floor
                entry["decode_only_fraction_of_floor"] = entry["decode_only_tok_s"] / floor
            if json_name:
                write_json(json_name, results)
        if "ours" in outputs:
            ours = outputs["ours"].to("cpu")
            row["agreement_with_ours"] = {
                p: float((o.to("cpu")[:, : ours.shape[1]] == ours).float().mean())
                for p, o in outputs.items() if p != "ours"}
            print(name, "agreement with ours", row["agreement_with_ours"], flush=True)
        if device.type == "cuda":
            row["kernel"] = kernel_bandwidth(model, [n + args.new_tokens // 2 for n in lengths], bandwidth, device)
            print(name, "kernel", row["kernel"], flush=True)
        results["workloads"][name] = row

    print(f"\ncopy bandwidth {bandwidth:.0f} GB/s")
    print(f"{'workload':<8}{'peer':<11}{'tok/s':>10}{'vs floor':>10}{'vs loop':>9}{'decode-only tok/s':>19}")
    for name, row in results["workloads"].items():
        loop_tps = row["peers"].get("loop", {}).get("tok_s")
        print(f"{name:<8}{'floor':<11}{row['floor_tok_s']:>10.0f}")
        for peer, e in row["peers"].items():
            if "tok_s" not in e:
                print(f"{name:<8}{peer:<11}  {e['error'][:80]}")
                continue
            ratio = f"{e['tok_s'] / loop_tps:.2f}x" if loop_tps else "-"
            decode_only = f"{e['decode_only_tok_s']:.0f} ({e['decode_only_fraction_of_floor']:.0%})" \
                if "decode_only_tok_s" in e else ""
            print(f"{name:<8}{peer:<11}{e['tok_s']:>10.0f}{e['fraction_of_floor']:>10.0%}{ratio:>9}{decode_only:>19}")
    if json_name:
        write_json(json_name, results)


if __name__ == "__main__":
    main()
