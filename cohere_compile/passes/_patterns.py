"""Helpers shared by the pattern-based passes.

Patterns are traced with Inductor's ``fwd_only`` from functions that mirror Hugging
Face's Cohere code, once with and once without dtype casts, and matched on the joint graph (``joint_custom_post_pass``),
where views are still ``aten.view`` and inference and training graphs both pass.

Training graphs hold the forward subgraph *and* its decomposed backward; a forward-only
pattern cannot match there (the backward reads its intermediates). ``register(...,
grad_variants=...)`` also traces the search function with ``joint_fwd_bwd`` (forward +
backward, tangents as pattern inputs) for each given set of inputs that require grad;
the replacement is traced the same way, so the backward graph gets our ``*_backward``
op from the custom op's ``register_autograd``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch._inductor.pattern_matcher import (
    FailedMatch,
    KeywordArg,
    Match,
    MatchContext,
    MatchResult,
    MultiOutputPattern,
    PatternExpr,
    PatternMatcherPass,
    fwd_only,
    fx_to_pattern,
    joint_fwd_bwd,
    gen_pattern_and_search_gm,
    is_match,
    register_replacement,
)
from torch.utils._ordered_set import OrderedSet

aten = torch.ops.aten
# Ops whose list argument is a shape burned in by the example trace.
_SHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
_ANY_SIZE = 0.5  # a float: fx_to_pattern ignores floats, so such a list matches any shape
# Backward traces also burn sizes into a zeros buffer (``full``) and into the divisor
# of a mean's gradient (``div.Scalar(grad, n)``): wildcards there too.
_JOINT_SHAPE_OPS = (aten.full.default, aten.new_zeros.default, aten.zeros.default)
_JOINT_SIZE_SCALAR_OPS = (aten.div.Scalar,)

# An fp32 trace has no casts; a bf16 trace has them. Cast targets are not part of
# a forward pattern, so the bf16 trace also matches fp16 graphs.
TRACE_DTYPES = (torch.float32, torch.bfloat16)
# Training (joint) patterns keep their cast targets: with dtype wildcards, the swiglu
# backward pattern matched a peft LoRA graph on the H200 whose fp32 cast (the adapter
# input) it took for the bf16 one of the trace, and the rewritten graph fed a bf16
# operand to an fp32 matmul. So each low-precision dtype gets its own joint trace.
JOINT_TRACE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# A value no model uses: the traced literal becomes a pattern argument (Inductor's
# scalar_workaround), so eps / scale are read from the matched graph, not assumed.
EPS_PLACEHOLDER = 0.000123456789
EPS_PLACEHOLDER_2 = 0.000987654321  # a second eps of one pattern (q's and k's norms)
SCALE_PLACEHOLDER = 0.123456789


def meta_val(match: Match, name: str):
    node = match.kwargs[name]
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def fold_round_trip_casts(graph: torch.fx.Graph) -> None:
    """``convert(convert(x, narrower), wider)`` -> ``convert(x, wider)`` (or just ``x`` when it
    already has the wider dtype), where the narrow cast has no other user: what torch 2.11's
    joint-graph ``pointless_convert`` does to a training graph (torch 2.13 keeps the rounding).
    In a bf16 peft LoRA graph it turns the gate gradient's bf16 round trip into one fp32 no-op
    cast, so a pattern traced with the round trip misses it. A pattern folded here ends at
    the value before the no-op cast, which matches with or without it."""
    convert = torch.ops.prims.convert_element_type.default
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for node in list(graph.nodes):
        inner = node.args[0] if node.target is convert else None
        if not (isinstance(inner, torch.fx.Node) and inner.target is convert and len(inner.users) == 1):
            continue
        source = inner.args[0]
        dtype = getattr(source.meta.get("val"), "dtype", None) if isinstance(source, torch.fx.Node) else None
        if not (dtype in floats and inner.args[1] in floats and node.args[1] in floats):
            continue
        if dtype == node.args[1]:
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        else:
            node.args = (source, node.args[1])
        graph.erase_node(inner)


class DistinctBranchesPattern(MultiOutputPattern):
    """A multi-output pattern whose outputs never bind two of its inputs to one node.

    Inductor matches a multi-output pattern's first output at the anchor, then takes the
    first candidate that matches each other output. When two branches are alike (q's and
    k's norm + RoPE) that candidate can be the first output's own branch again: k bound to
    q's node, k_weight to q's weight. The op then got one weight twice, one output went
    unused and k's branch stayed unfused, yet a rewrite was counted. Here such a candidate
    is rejected and the next one is tried."""

    def _match_from_anchors(self, pattern: PatternExpr, ctx: MatchContext) -> MatchResult:
        prior = dict(ctx.pattern_to_node)
        taken = {n for n in prior.values() if isinstance(n, torch.fx.Node)}
        m: MatchResult = FailedMatch("no anchor found")
        for node in pattern.find_anchor_nodes(ctx, OrderedSet()):
            m = ctx.match(pattern, node)
            # Shared intermediates (one cos.unsqueeze for q and k) are fine; a new input of
            # the pattern bound to a node that is already bound is the fault.
            reused = [n for p, n in ctx.pattern_to_node.items()
                      if p not in prior and isinstance(p, KeywordArg) and n in taken]
            if is_match(m) and not reused:
                return m
            if is_match(m):
                m = FailedMatch("an input bound to a node of an earlier output")
            ctx.pattern_to_node = dict(prior)  # revert the partial match
        return m


def strict_pattern(search_fn: Callable, example_inputs: Sequence, scalars: dict, trace_fn=fwd_only,
                   fold_casts: bool = False, distinct_branches: bool = False) -> PatternExpr:
    """Trace ``search_fn`` into a pattern that ignores shapes but keeps every other int.

    Inductor's own patterns ignore all ints on the first match and re-trace with the
    real shapes to check them; under ``dynamic=True`` that re-trace emits
    ``sym_size`` nodes the graph does not have, and nothing matches. Here only
    shape lists (view / reshape / expand) are wildcards; dims, slice starts and
    steps, exponents and permutations must match exactly, so one trace serves
    static and dynamic graphs alike.
    """
    _, gm = gen_pattern_and_search_gm(search_fn, example_inputs, trace_fn, scalars)
    if fold_casts:
        fold_round_trip_casts(gm.graph)
        gm.recompile()
    joint = trace_fn is joint_fwd_bwd
    for node in gm.graph.nodes:
        if node.target in _SHAPE_OPS:
            node.args = (node.args[0], [_ANY_SIZE] * len(node.args[1]), *node.args[2:])
        elif joint and node.target in _JOINT_SHAPE_OPS:
            node.args = ([_ANY_SIZE] * len(node.args[0]), *node.args[1:])
        elif joint and node.target in _JOINT_SIZE_SCALAR_OPS and isinstance(node.args[1], int):
            node.args = (node.args[0], _ANY_SIZE)
    argnames = list(inspect.signature(search_fn).parameters)
    if joint:  # tangents_1.. follow the arguments, as register_replacement's normalize_args expects
        argnames += [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.target.startswith("tangents")]
    pattern = fx_to_pattern(
        gm,
        ignore_types=(float, torch.device) if joint else (float, torch.device, torch.dtype),
        argnames=argnames,
        scalar_workaround=scalars,
    )
    if distinct_branches and isinstance(pattern, MultiOutputPattern):
        pattern.__class__ = DistinctBranchesPattern
    return pattern


def register(
    patterns: PatternMatcherPass,
    search_fn: Callable,
    replace_fn: Callable,
    make_inputs: Callable[[torch.dtype], Sequence],
    scalars: dict | None = None,
    extra_check: Callable[[Match], bool] | None = None,
    grad_variants: Sequence[Sequence[str]] = (),
    inference: bool = True,
    dtypes: Sequence[torch.dtype] | None = None,
    fold_casts: bool = False,
    distinct_branches: bool = False,
) -> None:
    """Register ``search_fn -> replace_fn`` for fp32 and low-precision graphs.

    ``make_inputs(dtype)`` returns one list of example inputs, or a list of such
    lists when the traced graph depends on input strides (e.g. ``matmul`` on a
    transposed view adds a ``clone``). Variants that trace to the same pattern are
    registered once. Each entry of ``grad_variants`` names the arguments that require
    grad in one training-graph (``joint_fwd_bwd``) variant, registered after the
    forward-only ones. ``inference=False`` registers the training variants only. ``dtypes``
    replaces the traced dtypes; ``fold_casts`` traces the torch 2.11 form of the graph
    (``fold_round_trip_casts``). ``distinct_branches`` keeps a multi-output pattern's outputs on
    separate branches of the graph (``DistinctBranchesPattern``).
    """
    # Patterns are built once per process, on first use; that may happen under
    # torch.inference_mode (e.g. generate), where register_replacement drops joint
    # (training) patterns for good. Build outside it.
    with torch.inference_mode(False):
        _register(patterns, search_fn, replace_fn, make_inputs, scalars, extra_check, grad_variants, inference,
                  dtypes, fold_casts, distinct_branches)


def _register(patterns, search_fn, replace_fn, make_inputs, scalars, extra_check, grad_variants, inference,
              dtypes=None, fold_casts=False, distinct_branches=False):
    scalars = dict(scalars or {})
    seen = getattr(patterns, "_cohere_seen", set())
    patterns._cohere_seen = seen
    argnames = list(inspect.signature(search_fn).parameters)
    traces = [(fwd_only, ())] * inference + [(joint_fwd_bwd, tuple(names)) for names in grad_variants]
    dtypes = {fwd_only: dtypes or TRACE_DTYPES, joint_fwd_bwd: dtypes or JOINT_TRACE_DTYPES}
    for (trace_fn, grad_names), dtype in ((t, d) for t in traces for d in dtypes[t[0]]):
        examples = list(make_inputs(dtype))
        variants = examples if isinstance(examples[0], (list, tuple)) else [examples]
        for inputs in variants:
            inputs = [
                x.detach().requires_grad_(name in grad_names) if isinstance(x, torch.Tensor) else x
                for name, x in zip(argnames, inputs)
            ]
            pattern = strict_pattern(search_fn, inputs, scalars, trace_fn, fold_casts, distinct_branches)
            key = (search_fn.__qualname__, trace_fn.__name__, grad_names, str(pattern))
            if key in seen:
                continue
            seen.add(key)
            kwargs = {"extra_check": extra_check} if extra_check is not None else {}
            register_replacement(
                search_fn,
                replace_fn,
                inputs,
                trace_fn,
                [patterns],
                scalar_workaround=scalars,
                search_fn_pattern=pattern,
                **kwargs,
            )
