"""``merge_projections``: projections that read the same input through weights lying back to back
in one storage (after ``colocate.ensure_colocated``: in Cohere's parallel block q, k, v, gate and
up all read the same normed hidden state) become one matmul over the whole block, and each old
output a slice of it. At decode sizes one long GEMV streams the
weights faster than three short ones (H200 probe, 32 Aya-8B layers in a CUDA graph: q+k+v
0.91 -> 0.53 ms, gate+up 1.96 -> 1.82 ms).

The weights stay separate graph inputs; the merged block is ``as_strided`` over the first one's
storage. That is only valid while the weights stay where they were when the graph was compiled,
which Dynamo does not guard, so this pass is **internal**: ``cc.generate`` (merging by default on
CUDA) enables it for its own compiled forwards and checks the layout before every call
(``colocate.py``). Two forms of a projection are recognised (inference graphs only):
- ``mm(X, permute(W, [1, 0]))``;
- Inductor's GEMV decomposition (CUDA, one row, coordinate-descent tuning): ``convert(sum(
  mul(X, unsqueeze(convert(permute(W, [1, 0])), 0)), [1]))``, where the converts are optional.
Our int4 linears (``cohere::int4_linear(X, packed, scales, zeros, group_size)``) merge the same
way when all three buffers are co-located in the same order: one int4 GEMV over the three
blocks (H200, B1: unmerged, the five Aya-8B projections of a layer are five GEMVs of 6-19 us each).
"""

from __future__ import annotations

import torch
from torch._inductor.pattern_matcher import stable_topological_sort

from .attention import _set_fake_val, _val

NAME = "merge_projections"
aten, prims = torch.ops.aten, torch.ops.prims
_CONVERT = prims.convert_element_type.default


def _hashable(args) -> tuple:
    return tuple(_hashable(a) if isinstance(a, (list, tuple)) else a for a in args)


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class _Projection:
    """One projection found from its weight placeholder: the weight-side chain (permute, then
    optional convert / unsqueeze), the consumer (mm or mul), the X it reads, and its output."""

    def __init__(self, weight, chain, consumer, x, output):
        self.weight, self.chain, self.consumer, self.x, self.output = weight, chain, consumer, x, output
        val = _val(weight)
        self.rows, self.cols = val.shape
        self.offset = val.storage_offset()

    def signature(self) -> tuple:
        """What must be equal for projections to merge (all but the weight): the same X (up to
        the view / cast / unsqueeze steps each branch may repeat), the same weight-side steps."""
        chain = tuple((n.target, _hashable(n.args[1:])) for n in self.chain)
        return (_canonical(self.x), chain, self.consumer.target, _val(self.weight).dtype, self.cols)

    @property
    def storage(self) -> int:
        return _val(self.weight).untyped_storage()._cdata  # the StorageImpl: shared by views of one buffer


_X_STEPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default, _CONVERT)


def _canonical(x: torch.fx.Node) -> tuple:
    """X as (source node, steps from it): branches that each re-derive X from one tensor agree."""
    steps = []
    while isinstance(x, torch.fx.Node) and x.target in _X_STEPS:
        steps.append((x.target, _hashable(x.args[1:])))
        x = x.args[0]
    return (x, tuple(reversed(steps)))


def _find(weight: torch.fx.Node) -> _Projection | None:
    val = _val(weight)
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or val.stride() != (val.shape[1], 1):
        return None
    node = _single_user(weight)
    if node is None or node.target != aten.permute.default or list(node.args[1]) != [1, 0]:
        return None
    chain = [node]
    while True:
        nxt = _single_user(node)
        if nxt is None:
            return None
        if nxt.target == _CONVERT or (nxt.target == aten.unsqueeze.default and nxt.args[1] == 0):
            chain.append(nxt)
            node = nxt
            continue
        break
    consumer = nxt
    if consumer.op != "call_function" or len(consumer.args) < 2 or consumer.args[1] is not node:
        return None
    if consumer.target == aten.mm.default and chain[-1].target != aten.unsqueeze.default:
        last = consumer
    elif consumer.target == aten.mul.Tensor and chain[-1].target == aten.unsqueeze.default:
        last = _single_user(consumer)
        if last is None or last.target != aten.sum.dim_IntList or list(last.args[1]) != [1]:
            return None
    else:
        return None
    cast = _single_user(last)
    output = cast if cast is not None and cast.target == _CONVERT else last
    return _Projection(weight, chain, consumer, consumer.args[0], output)


class _Int4Projection:
    """One ``cohere::int4_linear`` call whose three buffers are graph inputs."""

    def __init__(self, node: torch.fx.Node):
        self.consumer = self.output = node
        self.x, self.packed, self.scales, self.zeros, self.group_size = node.args
        self.buffers = (self.packed, self.scales, self.zeros)
        self.rows = _val(self.packed).shape[0]
        self.offset = _val(self.packed).storage_offset()

    def signature(self) -> tuple:
        return (_canonical(self.x), self.group_size, *((_val(b).dtype, _val(b).shape[1]) for b in self.buffers))

    @property
    def storage(self) -> tuple:
        return tuple(_val(b).untyped_storage()._cdata for b in self.buffers)

    def follows(self, prev: "_Int4Projection") -> bool:
        """Right after ``prev`` in all three blocks."""
        return all(_val(b).storage_offset() == _val(a).storage_offset() + _val(a).numel()
                   for a, b in zip(prev.buffers, self.buffers))


def _find_int4(node: torch.fx.Node) -> _Int4Projection | None:
    if node.op != "call_function" or node.target != _int4_linear() or len(node.args) != 5 or node.kwargs:
        return None
    bufs = node.args[1:4]
    vals = [_val(b) for b in bufs]
    if not all(isinstance(b, torch.fx.Node) and b.op == "placeholder" for b in bufs):
        return None
    if not all(isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_contiguous() for v in vals):
        return None
    return _Int4Projection(node)


def _int4_linear():
    from ..ops import int4  # noqa: F401  (registers cohere::int4_linear)

    return torch.ops.cohere.int4_linear.default


def _runs(by_key: dict, follows) -> list[list]:
    """Per key, the projections sorted by storage offset, cut into runs where each follows the
    one before it (runs of at least two)."""
    groups = []
    for found in by_key.values():
        found.sort(key=lambda p: p.offset)
        run = [found[0]]
        for p in found[1:]:
            if follows(p, run[-1]):
                run.append(p)
                continue
            if len(run) > 1:
                groups.append(run)
            run = [p]
        if len(run) > 1:
            groups.append(run)
    return groups


def _int4_groups(graph: torch.fx.Graph) -> list[list[_Int4Projection]]:
    by_key: dict[tuple, list[_Int4Projection]] = {}
    for node in graph.nodes:
        p = _find_int4(node)
        if p is not None:
            by_key.setdefault((p.signature(), p.storage), []).append(p)
    return _runs(by_key, lambda p, prev: p.follows(prev))


def _merge_int4(graph: torch.fx.Graph, group: list[_Int4Projection], order: dict) -> None:
    first = group[0]
    earliest = min(group, key=lambda p: order[p.consumer])
    rows = sum(p.rows for p in group)
    with graph.inserting_before(earliest.consumer):
        blocks = []
        for b in first.buffers:
            cols, offset = _val(b).shape[1], _val(b).storage_offset()
            blocks.append(_call(graph, aten.as_strided.default, (b, [rows, cols], [cols, 1], offset)))
        merged = _call(graph, _int4_linear(), (earliest.x, *blocks, first.group_size))
        last_dim, start = _val(merged).dim() - 1, 0
        for p in group:
            piece = _call(graph, aten.slice.Tensor, (merged, last_dim, start, start + p.rows))
            start += p.rows
            p.output.replace_all_uses_with(piece)


def _groups(graph: torch.fx.Graph) -> list[list[_Projection]]:
    """Projections with the same signature whose weights tile one storage without gaps, in
    storage order (runs of at least two)."""
    by_signature: dict[tuple, list[_Projection]] = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        p = _find(node)
        if p is not None:
            by_signature.setdefault((p.signature(), p.storage), []).append(p)
    return _runs(by_signature, lambda p, prev: p.offset == prev.offset + prev.rows * prev.cols)


def _call(graph: torch.fx.Graph, target, args) -> torch.fx.Node:
    node = graph.call_function(target, args)
    _set_fake_val(node)
    return node


def _merge(graph: torch.fx.Graph, group: list[_Projection], order: dict) -> None:
    first = group[0]  # lowest storage offset: the merged block starts at its weight
    # Insert before the group's earliest consumer, reading that branch's X (every branch's X
    # has the same value, and that one is defined before this point).
    earliest = min(group, key=lambda p: order[p.consumer])
    rows = sum(p.rows for p in group)
    with graph.inserting_before(earliest.consumer):
        node = _call(graph, aten.as_strided.default, (first.weight, [rows, first.cols], [first.cols, 1], first.offset))
        for link in first.chain:
            node = _call(graph, link.target, (node, *link.args[1:]))
        node = _call(graph, first.consumer.target, (earliest.x, node))
        if first.consumer.target == aten.mul.Tensor:  # the GEMV decomposition: sum over K
            total = _single_user(first.consumer)
            node = _call(graph, total.target, (node, *total.args[1:]))
        if first.output.target == _CONVERT:  # a cast back after the matmul
            node = _call(graph, first.output.target, (node, *first.output.args[1:]))
        merged, start = node, 0
        for p in group:
            piece = _call(graph, aten.slice.Tensor, (merged, 1, start, start + p.rows))
            start += p.rows
            p.output.replace_all_uses_with(piece)


def merge_projections(graph: torch.fx.Graph) -> int:
    """Rewrite every mergeable group; returns the number of groups merged."""
    # The passes before this one leave their replacements where their patterns began: order the
    # graph first (this pass inserts relative to node order), then drop dead users (e.g. casts a
    # decomposition left), which would hide single-use chains.
    stable_topological_sort(graph)
    graph.eliminate_dead_code()
    groups, int4_groups = _groups(graph), _int4_groups(graph)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for group in groups:
        _merge(graph, group, order)
    for group in int4_groups:
        _merge_int4(graph, group, order)
    groups += int4_groups
    if groups:
        graph.eliminate_dead_code()
    return len(groups)
