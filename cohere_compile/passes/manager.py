"""The pass manager: one Inductor ``CustomGraphPass`` that runs the enabled rewrites.

It is installed as ``joint_custom_post_pass`` (torch 2.11/2.12 take a single pass
per hook, 2.13 a list: one manager works on all). Its ``uuid`` hashes the source
of every module of the package plus the enabled pass list, so the FX graph
cache stays on and is never served a graph rewritten by other code or options.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import PatternMatcherPass, stable_topological_sort

from .. import ops  # noqa: F401  (registers the cohere:: ops the replacements call)
from . import attention, causal_attention, layer_norm, linear_cross_entropy, paged_attention, qk_norm_rope, swiglu
from .int4_split_k import sum_split_k_in_consumer
from .merge_projections import merge_projections
from .rope_kv_write import fuse_rope_into_kv_write

# Application order matters: qk_norm_rope must claim the per-head norms before
# layer_norm looks at norms, and layer_norm's fused adds come before plain norms.
# causal_attention before attention: with both on, it takes the plain-causal attention and
# attention the masked rest.
_MODULES = {m.NAME: m for m in (qk_norm_rope, causal_attention, attention, paged_attention, swiglu, layer_norm,
                                linear_cross_entropy)}
PASS_NAMES: tuple[str, ...] = tuple(_MODULES)
# On by default only where an H200 run shows the pass at least as fast as Inductor's own code
# everywhere (ties within 1%) and faster somewhere. The per-pass ablation
# (bench/results/prefill_aya-8b_L4_ablation.json: Aya-8B shapes, 4 layers, B1/B4 x 2048),
# 2026-11-29:
#   swiglu        B1 -3.6%, B4 +0.3%  -> on
#   layer_norm    B1 -1.5%, B4 +1.2%  -> off
#   qk_norm_rope  B1 +2.0%, B4 +1.2%  -> off
#   attention     B1 +8.4%, B4 +7.9%  -> off (Triton kernel with HF's mask at 80-115 TFLOP/s vs
#                 SDPA's 145-165)
# 2026-11-30, 32 layers (bench/results/prefill_aya-8b_L32_causal.json), vs plain torch.compile:
#   swiglu + attention's causal route  B1 1.095x, B4 1.081x -> causal_attention (that route
#                 alone) on; all passes (the six of then) B1 1.106x, B4 1.112x (layer_norm and qk_norm_rope
#                 stay off until a 32-layer ablation settles the L4 result above)
# The others stay available by name: optimize(model, passes=PASS_NAMES).
#   paged_attention: only fires on decode over cc.PagedKVCache, where the alternative is
#                 a dense gather of the whole cache per layer -> on (bench/results/decode_*.json)
DEFAULT_PASSES: tuple[str, ...] = ("causal_attention", "paged_attention", "swiglu")

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def _stages(name: str) -> tuple:
    """Patterns are traced once per process, on first use."""
    return tuple(_MODULES[name].build())


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """Every module of the package, not just passes/ops/kernels: the backend's setup and the
    weight layout that merged projections read (storage offsets, which the FX cache key leaves
    out) shape compiled graphs as well."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE_ROOT.rglob("*.py")):
        h.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class _Recorder(threading.local):
    def __init__(self):
        self.stack: list[list[dict[str, int]]] = []


_RECORDER = _Recorder()


@contextlib.contextmanager
def recording() -> Iterator[list[dict[str, int]]]:
    """Collect the rewrite counts of every graph our passes see inside the block
    (one dict per graph). Counts come from the pass itself, so compile with the
    FX graph cache off (``explain`` does) or a cache hit reports nothing."""
    graphs: list[dict[str, int]] = []
    _RECORDER.stack.append(graphs)
    try:
        yield graphs
    finally:
        _RECORDER.stack.pop()


def validate_pass_names(passes: Iterable[str]) -> tuple[str, ...]:
    passes = tuple(passes)
    unknown = [p for p in passes if p not in _MODULES]
    if unknown:
        raise ValueError(f"unknown pass name(s) {unknown}; choose from {list(PASS_NAMES)}")
    return tuple(p for p in PASS_NAMES if p in passes)  # canonical order


def is_training_graph(graph: torch.fx.Graph) -> bool:
    """A joint forward+backward graph (AOTAutograd names its gradient inputs ``tangents_*``)."""
    return any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)


class CoherePassManager(CustomGraphPass):
    """Runs the enabled passes on inference graphs, and on training (joint) graphs only with
    ``training_rewrites=True``. Opt-in because no measured workload is faster with them: on the
    H200 (2026-11-29, 32-layer bf16 LoRA, bench/results/train_aya-8b_L32_B4x1024.json) they ran
    at 0.99x with only the fused loss firing (peak 46.1 -> 40.7 GB); once swiglu matched torch
    2.11's form of the layer graph too, the step was about 5% slower (peak 1.7 GB lower)."""

    def __init__(self, passes: Iterable[str] = DEFAULT_PASSES, training_rewrites: bool = False,
                 merge_projections: bool = False, int4_split_k: bool = True):
        self.passes = validate_pass_names(passes)
        self.training_rewrites = bool(training_rewrites)
        # internal (cc.generate only, which checks the weight layout it relies on before every call)
        self.merge_projections = bool(merge_projections)
        self.int4_split_k = bool(int4_split_k)  # inference graphs; fires on one-row int4 GEMVs only

    def __call__(self, graph: torch.fx.Graph) -> None:
        counts = {}
        training = is_training_graph(graph)
        if training and not self.training_rewrites:
            for graphs in _RECORDER.stack:
                graphs.append({name: 0 for name in self.passes})
            return
        for name in self.passes:
            counts[name] = 0
            for stage in _stages(name):
                found = stage.apply(graph) if isinstance(stage, PatternMatcherPass) else stage(graph)
                counts[name] += int(found or 0)
        if self.merge_projections and not training:
            counts["merge_projections"] = merge_projections(graph)  # last: the passes above keep the projections
        if self.int4_split_k and not training:
            split = sum_split_k_in_consumer(graph)  # after merging (a merged GEMV may split differently)
            if split:  # (recorded only where it fires: one-row int4 GEMVs with few output blocks)
                counts["int4_split_k"] = split
        if {"qk_norm_rope", "paged_attention"} <= set(self.passes) and not training:
            fused = fuse_rope_into_kv_write(graph)  # after qk_norm_rope made the rotation
            if fused:  # (recorded only where it fires: most graphs have no paged cache write)
                counts["rope_kv_write"] = fused
        # A replacement lands where its pattern's first node was; an input defined
        # later (dynamic=True turns eps into a graph input cast just before use)
        # must be moved ahead of it, as Inductor's own joint passes do.
        stable_topological_sort(graph)
        graph.eliminate_dead_code()
        for graphs in _RECORDER.stack:
            graphs.append(counts)

    def uuid(self) -> str:
        key = (f"{_source_hash()}|{','.join(self.passes)}|training={self.training_rewrites}"
               f"|merge={self.merge_projections}|int4_split_k={self.int4_split_k}|{torch.__version__}")
        return hashlib.sha256(key.encode()).hexdigest()

    def __repr__(self) -> str:
        return (f"CoherePassManager(passes={list(self.passes)}, training_rewrites={self.training_rewrites}, "
                f"merge_projections={self.merge_projections}, int4_split_k={self.int4_split_k})")
