"""Which part of cc.generate's CUDA path changes greedy tokens? A bisection probe, one process.

On 2026-12-02 two GPU tests of cc.generate (test_gpu_paged.py's PDL test with PDL off, and
test_merge_projections.py's bf16 decode) gave tokens unlike their references from the first
decode step, while the same tests (or the same code) had passed in other runs. This runs the
first test's case (a tiny fp32 model, three prompts through a two-row cache, so one joins late;
built by that test's own helper), and two control layouts (``--cases``), under each setting that could matter, each ``--repeats`` times, against HF's greedy tokens, with
and without a side stream keeping the GPU busy (``--contention``: makes host/device races
likelier), and writes which settings match.

    python bench/generate_parity.py [--repeats 3] [--cases qknorm_gqa,...] [--variants default,...]
        [--contention [--only-busy]] [--name generate_parity.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import threading

import torch

import cohere_compile as cc
from bench.common import environment, write_json
from tests.test_gpu_paged import _hf_greedy_case, first_difference

VARIANTS = {  # name -> cc.generate keyword arguments
    "default": {},
    "eager": {"compiled": False},
    "no_cuda_graphs": {"cuda_graphs": False},
    "unmerged": {"merge_projections": False},
    "no_extra_passes": {"passes": []},
    "no_coordinate_descent": {"inductor_options": {"coordinate_descent_tuning": False}},
    "pdl": {"inductor_options": {"triton.enable_pdl": True}},
    # cc.optimize's default passes only: no qk_norm_rope (so no fused RoPE + cache write) on CUDA
    "no_qk_norm_rope": {"passes": ["causal_attention", "swiglu"]},
    # the PDL test passed twice with PDL in inductor_options (which reach the prefill graph too) and
    # failed with it off there (explicitly, or as then generate's decode-only default)
    "pdl_off": {"inductor_options": {"triton.enable_pdl": False}},
}


# Both failing tests (and no passing one) had QK norm with GQA; the passing greedy tests had QK
# norm with MHA, or GQA without QK norm: the other two cases are the controls.
CASES = {"qknorm_gqa": (True, 2), "qknorm_mha": (True, 4), "gqa": (False, 2)}
NEW_TOKENS = 24


def hf_case(device, case="qknorm_gqa"):
    """The PDL test's prompts and HF references (``case`` picks QK norm and KV heads)."""
    use_qk_norm, kv_heads = CASES[case]
    return _hf_greedy_case(use_qk_norm, kv_heads, (9, 130, 40), NEW_TOKENS, prompt_seed=2, device=device)


class Contention:
    """Large matmuls on a side stream from a thread, for as long as the context is open."""

    def __init__(self):
        self.stop = threading.Event()

    def _run(self):
        stream = torch.cuda.Stream()
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        with torch.cuda.stream(stream):
            while not self.stop.is_set():
                for _ in range(8):
                    a @ a
                stream.synchronize()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def busy_settings(args) -> list[bool]:
    if not args.contention:
        return [False]
    return [True] if args.only_busy else [False, True]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--contention", action="store_true", help="also run every variant with the GPU kept busy")
    ap.add_argument("--only-busy", action="store_true", help="with --contention: skip the runs on an idle GPU")
    ap.add_argument("--name", default="generate_parity.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (no contention)")
    args = ap.parse_args()
    results = {"env": environment() if args.device == "cuda" else {"device": args.device}, "args": vars(args), "runs": []}
    for case, busy in itertools.product(args.cases.split(","), busy_settings(args)):
        model, prompts, refs = hf_case(torch.device(args.device), case)
        for name in args.variants.split(","):
            for repeat in range(args.repeats):
                # compile afresh for each run (and stay under Dynamo's recompile limit, past which
                # it would quietly run the forward eagerly)
                model.__dict__.pop("_cohere_generate_fns", None)
                torch._dynamo.reset()
                row = {"case": case, "variant": name, "contention": busy, "repeat": repeat}
                try:
                    with Contention() if busy else contextlib.nullcontext():
                        got = cc.generate(model, prompts, NEW_TOKENS, stop_tokens=(), block_size=64, max_batch_size=2,
                                          **VARIANTS[name])
                    row.update(matches_hf=got == refs, first_difference=first_difference(got, refs))
                except Exception as e:  # a variant that fails is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                results["runs"].append(row)
                write_json(args.name, results)  # after every run: a cut-off call keeps what it has
                print(row, flush=True)


if __name__ == "__main__":
    main()
