"""int4 GEMV kernel bench: our Triton kernel vs torchao tinygemm vs bf16 ``torch.mm`` at Aya-8B shapes.

For each linear shape (N out, K in) and each M (decode rows, default 1): one weight, quantized
both ways with the same math (asymmetric groups of --group-size). Each call is timed inside a
CUDA graph (``bench.common.cuda_graph_time_s``: no launch overhead, as in a graph-captured decode
step); reported: median us per call and achieved GB/s of the bytes a call must read (our packed
weights + scales + zeros + x; torchao's packed tensor + scales/zeros + x; the bf16 weight + x).
``ours`` is what ``cohere::int4_linear`` runs: at M = 1 the word-wise kernel
(``kernels/int4_gemv_m1.py``), else the row kernel (``kernels/int4_gemv.py``); at M = 1
``ours_rows`` also times the row kernel, the op's M = 1 path before 2026-12-03.
``--sweep`` also times our kernel over a small grid of launch knobs (at M = 1 the word-wise
kernel's BLOCK_N, BLOCK_K, SPLIT_K, num_warps, prefetch; else the row kernel's) and reports the
best per shape, to pick the defaults.

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/int4_gemv.py                 # Aya shapes, M=1
    TRITON_INTERPRET=0 PYTHONPATH=$PWD python bench/int4_gemv.py --m 1,4,16 --sweep
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python bench/int4_gemv.py --tiny --device cpu   # CPU smoke test
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import call_times_ms, copy_bandwidth_gbs, cuda_graph_time_s, write_json  # noqa: E402
from bench.quant import tensor_bytes  # noqa: E402

AYA_SHAPES = {"kv_proj": (1024, 4096), "q_o_proj": (4096, 4096), "gate_up_proj": (14336, 4096),
              "down_proj": (4096, 14336), "lm_head": (256000, 4096),
              "merged_qkv_gate_up": (4096 + 2 * 1024 + 2 * 14336, 4096)}  # what merge_projections decodes with
TINY_SHAPES = {"kv_proj": (48, 256), "down_proj": (64, 512)}
SWEEP = dict(block_n=(8, 16, 32), block_k=(256, 512, 1024), split_k=(None, 1), num_warps=(4, 8), num_stages=(2,),
             reduce_at_end=(None, False))
SWEEP_WIDE = dict(block_n=(4, 8, 16, 32, 64), block_k=(128, 256, 512, 1024), split_k=(None, 1, 2, 4),
                  num_warps=(2, 4, 8), num_stages=(1, 2, 3), reduce_at_end=(None, False))
# stages > 1 is Triton's shared-memory pipeline (prefetch is then unused: only False is timed); it
# did not pay on the H200 (int4_gemv_m1_stages.json), so the sweep now times lean (_step_lean) instead
# (sm_90 SASS at 128 x 256, 4 warps, no prefetch: lean 0/1/2 = 3.78/3.59/3.47 per weight, 168/128/167 registers)
SWEEP_M1 = dict(block_n=(16, 64, 128), block_k=(256, 512), split_k=(None,), num_warps=(4, 8),
                prefetch=(True, False), stages=(1,), lean=(0, 1, 2))
SWEEP_M1_TINY = dict(block_n=(16, 32), block_k=(128,), split_k=(None, 1), num_warps=(4,), prefetch=(True, False),
                     stages=(1, 3), lean=(0, 1, 2))
SWEEP_TINY = dict(block_n=(16,), block_k=(128, 256), split_k=(None, 1), num_warps=(4,), num_stages=(2,),
                  reduce_at_end=(None, False))


def time_s(fn, device, calls: int) -> float:
    if device.type == "cuda":
        return cuda_graph_time_s(fn, calls=calls)
    fn()
    return statistics.median(call_times_ms(fn, "cpu", 3)) / 1e3


def nbytes(*tensors) -> int:
    return sum(tensor_bytes(t) for t in tensors)


def bench_shape(name, n, k, m, args, device) -> dict:
    from cohere_compile.kernels.int4_gemv import int4_gemv
    from cohere_compile.kernels.int4_gemv_m1 import auto_split_k as m1_auto_split_k
    from cohere_compile.kernels.int4_gemv_m1 import int4_gemv_m1
    from cohere_compile.quant import int4_config, quantize_int4

    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) * 0.02
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    packed, scales, zeros = quantize_int4(w, args.group_size)
    res = {"n": n, "k": k, "m": m}

    def record(label, fn, tensors):
        try:
            read_bytes = nbytes(*tensors())
            s = time_s(fn, device, args.calls)
            res[label] = {"us": s * 1e6, "gbs": read_bytes / s / 1e9, "bytes": read_bytes}
        except Exception as e:  # noqa: BLE001  (one failing peer must not lose the others)
            res[label] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} M={m} {label} FAILED: {res[label]['error']}", flush=True)

    ours_bytes = nbytes(packed, scales, zeros, x)
    record("ours", lambda: torch.ops.cohere.int4_linear(x, packed, scales, zeros, args.group_size),
           lambda: (packed, scales, zeros, x))
    if m == 1:
        record("ours_rows", lambda: int4_gemv(x, packed, scales, zeros, args.group_size),
               lambda: (packed, scales, zeros, x))
    if not args.no_torchao:
        from torchao.quantization import quantize_

        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        try:
            quantize_(lin, int4_config(device, dtype, args.group_size))
        except Exception as e:  # noqa: BLE001
            res["torchao"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} M={m} torchao FAILED: {res['torchao']['error']}", flush=True)
        else:
            record("torchao", lambda: lin(x), lambda: (lin.weight, x))
    record("bf16_mm", lambda: torch.mm(x, w.t()), lambda: (w, x))
    if args.sweep:
        if m == 1:
            grid, fn = (SWEEP_M1_TINY if args.tiny else SWEEP_M1), int4_gemv_m1
        else:
            grid, fn = (SWEEP_TINY if args.tiny else SWEEP_WIDE if args.sweep_wide else SWEEP), int4_gemv
        best = None
        res["sweep"] = []
        for values in itertools.product(*grid.values()):
            knobs = dict(zip(grid, values))
            if m > 1 and knobs["reduce_at_end"] is False:
                continue  # the same kernel as None for M > 1
            if m == 1 and knobs["split_k"] == 1 and m1_auto_split_k(-(-n // knobs["block_n"]), 2) == 1:
                continue  # auto split is 1 here too: the same launch as split_k=None
            if m == 1 and knobs["stages"] > 1 and knobs["prefetch"]:
                continue  # the pipelined kernel ignores prefetch
            try:
                s = time_s(lambda: fn(x, packed, scales, zeros, args.group_size, **knobs), device, args.calls)
            except Exception as e:  # noqa: BLE001  (e.g. out of shared memory for a large tile)
                res["sweep"].append({**knobs, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            entry = {**knobs, "us": s * 1e6, "gbs": ours_bytes / s / 1e9}
            res["sweep"].append(entry)
            if best is None or entry["us"] < best["us"]:
                best = entry
        res["best"] = best
    for peer in ("torchao", "bf16_mm", "ours_rows"):
        if "us" in res.get("ours", {}) and "us" in res.get(peer, {}):
            res[f"speedup_vs_{peer}"] = res[peer]["us"] / res["ours"]["us"]
    return res


def table(results: dict, copy_gbs: float) -> str:
    lines = [f"device copy: {copy_gbs:.0f} GB/s (read + write)",
             "| shape | N x K | M | ours us | ours GB/s | row kernel us | row kernel GB/s | torchao us | torchao GB/s "
             "| bf16 us | bf16 GB/s | ours vs torchao | ours vs bf16 | ours vs row kernel | best sweep (us, knobs) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(r, key):
        return (f"{r[key]['us']:.1f} | {r[key]['gbs']:.0f}" if "us" in r.get(key, {}) else "FAILED | -") \
            if key in r else "- | -"

    for label, r in results.items():
        best = r.get("best")
        knobs = {k: v for k, v in (best or {}).items() if k not in ("us", "gbs")}
        best_s = f"{best['us']:.1f} ({' '.join(f'{k}={v}' for k, v in knobs.items())})" if best else "-"
        ratios = " | ".join(f"{r[f'speedup_vs_{p}']:.2f}x" if f"speedup_vs_{p}" in r else "-"
                            for p in ("torchao", "bf16_mm", "ours_rows"))
        lines.append(f"| {label.rsplit('_M', 1)[0]} | {r['n']} x {r['k']} | {r['m']} | {cell(r, 'ours')} | "
                     f"{cell(r, 'ours_rows')} | {cell(r, 'torchao')} | {cell(r, 'bf16_mm')} | {ratios} | {best_s} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test through the interpreter)")
    ap.add_argument("--m", default="1", help="comma-separated rows per call (decode batch), each <= 16")
    ap.add_argument("--shapes", default=None, help=f"comma-separated subset of {list(AYA_SHAPES)}")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calls", type=int, default=20, help="calls per CUDA graph")
    ap.add_argument("--sweep", action="store_true", help="also sweep our kernel's launch knobs")
    ap.add_argument("--sweep-wide", action="store_true", help="with --sweep: a much larger grid (slow)")
    ap.add_argument("--no-torchao", action="store_true", help="skip the torchao tinygemm peer")
    ap.add_argument("--out", default=None, help="JSON name in bench/results/")
    args = ap.parse_args(argv)

    import cohere_compile  # noqa: F401  (registers cohere::int4_linear)

    device = torch.device(args.device)
    args.sweep = args.sweep or args.sweep_wide
    if args.tiny and device.type == "cpu" and not args.no_torchao:
        args.no_torchao = True  # tinygemm is CUDA-only; torchao's CPU int4 is a different kernel
    shapes = TINY_SHAPES if args.tiny else AYA_SHAPES
    if args.shapes:
        shapes = {s: shapes[s] for s in args.shapes.split(",")}
    res = {"args": vars(args)}
    if device.type == "cuda":
        from bench.common import environment

        res["environment"] = environment()
    copy_gbs = copy_bandwidth_gbs(device)
    res["copy_gbs"] = copy_gbs
    res["shapes"] = {}
    name = args.out or f"int4_gemv_{'tiny' if args.tiny else 'aya-8b'}_{device.type}.json"
    for m in (int(v) for v in args.m.split(",")):
        for label, (n, k) in shapes.items():
            r = bench_shape(label, n, k, m, args, device)
            res["shapes"][f"{label}_M{m}"] = r
            print(f"{label} M={m}: " + ", ".join(f"{p} {r[p]['us']:.1f} us" for p in ("ours", "ours_rows", "torchao", "bf16_mm")
                                                 if "us" in r.get(p, {})), flush=True)
            write_json(name, res)  # a run cut short keeps the shapes done so far
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(table(res["shapes"], copy_gbs))
    print("wrote", write_json(name, res))
    return res


if __name__ == "__main__":
    main()
