"""Sum a one-row int4 GEMV's split-K partials in the kernel that consumes its output (internal;
runs on inference graphs with static shapes, i.e. ``cc.generate``'s decode step).

A weight with few output blocks (Aya-8B's down projection: N = 4096, 32 blocks of 128 rows)
splits K so the GPU fills (``kernels/int4_gemv_m1.auto_split_k``), and ``cohere::int4_linear``
then sums the fp32 partials and casts them in two more kernels of its own: 64 short kernels per
decode step that launch without PDL. Here ``int4_linear(x, ...)`` becomes
``convert(sum(cohere::int4_linear_partials(x, ...), 0), x.dtype)`` as aten ops, which Inductor
fuses into the consumer (the residual adds and the next layer's norm). Same math: the fp32 sum of
the same partials, one rounding to x's dtype.

When x is ``cohere::swiglu(gate, up)`` read by this linear alone, the GEMV computes the activation
as it reads its input (``partials(gate, ..., up=up)``) and the SwiGLU kernel goes too; such a
linear is rewritten even where K does not split.

Only where the op would run the word-wise kernel (one row known at compile time, groups of >= 8,
K a multiple of 8, a device Triton runs on) and only on inference graphs.
"""

from __future__ import annotations

import torch

from ..kernels import int4_gemv_m1
from ..ops._dispatch import use_triton
from .attention import _set_fake_val, _val

aten, prims = torch.ops.aten, torch.ops.prims
_LINEAR = torch.ops.cohere.int4_linear.default
_PARTIALS = torch.ops.cohere.int4_linear_partials.default
_SWIGLU = torch.ops.cohere.swiglu.default


def _split_of(node: torch.fx.Node) -> int | None:
    """The split-K slices the word-wise kernel would launch for this call, or None where the op
    would not run that kernel."""
    x, packed, _, _, group_size = node.args
    xv, pv = _val(x), _val(packed)
    if not (isinstance(xv, torch.Tensor) and isinstance(pv, torch.Tensor)) or not use_triton(xv):
        return None
    if any(not isinstance(d, int) for d in (*xv.shape, *pv.shape)):  # symbolic (dynamic prefill)
        return None
    if not int4_gemv_m1.supports_layout(xv, pv, group_size):
        return None
    return int4_gemv_m1.launch_plan(pv.shape[0], xv.shape[-1], group_size)["split"]


def _swiglu_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ``cohere::swiglu`` node that produces this linear's x and nothing else reads."""
    x = node.args[0]
    if (isinstance(x, torch.fx.Node) and x.target is _SWIGLU and len(x.users) == 1 and len(x.args) == 2
            and not x.kwargs):
        return x
    return None


def _call(graph: torch.fx.Graph, target, args) -> torch.fx.Node:
    node = graph.call_function(target, args)
    _set_fake_val(node)
    return node


def sum_split_k_in_consumer(graph: torch.fx.Graph) -> int:
    """Rewrite every split (or SwiGLU-fed) one-row ``cohere::int4_linear``; returns how many."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.target is not _LINEAR:
            continue
        split, act = _split_of(node), _swiglu_input(node)
        if split is None or (split < 2 and act is None):
            continue
        out = _val(node)
        with graph.inserting_before(node):
            if act is None:
                partials = _call(graph, _PARTIALS, node.args)
            else:
                gate, up = act.args
                partials = _call(graph, _PARTIALS, (gate, *node.args[1:], up))
            total = _call(graph, aten.sum.dim_IntList, (partials, [0], True))
            cast = _call(graph, prims.convert_element_type.default, (total, out.dtype))
            result = _call(graph, aten.view.default, (cast, list(out.shape)))
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        if act is not None:
            graph.erase_node(act)
        rewritten += 1
    return rewritten
