"""``merge_projections``: projections whose weights lie side by side in one storage (after
``colocate.ensure_colocated``) become one matmul over the whole block. Two kinds, both from
Cohere's parallel block:

- **Shared input** (weights stacked row-wise): q, k, v, gate and up read the same normed hidden
  state; the merged matmul's output is sliced back into the five. At decode sizes one long GEMV
  streams the weights faster than three short ones (H200 probe, 32 Aya-8B layers in a CUDA graph:
  q+k+v 0.91 -> 0.53 ms, gate+up 1.96 -> 1.82 ms).
- **Shared sum** (weights side by side column-wise): ``residual + o(a) + down(m)`` is
  ``residual + [W_o | W_down] @ [a; m]``, one matmul over the concatenated inputs (o's 4096 x 4096
  GEMV alone is too short to stream at full bandwidth). The two partial products are summed in
  the matmul's fp32 accumulator and rounded once (eager rounds each, then their sum).

The weights stay separate graph inputs; the merged block is ``as_strided`` over the first one's
storage. That is only valid while the weights stay where they were when the graph was compiled,
which Dynamo does not guard, so this pass is **internal**: ``cc.generate`` (merging by default on
CUDA) enables it for its own compiled forwards and checks the layout before every call
(``colocate.py``). Two forms of a projection are recognised (inference graphs only):
- ``mm(X, permute(W, [1, 0]))``;
- Inductor's GEMV decomposition (CUDA, one row, coordinate-descent tuning): ``convert(sum(
  mul(X, unsqueeze(convert(permute(W, [1, 0])), 0)), [1]))``, where the converts are optional.
"""

from __future__ import annotations

from typing import NamedTuple

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
        self.row_stride = val.stride(0)  # cols where contiguous; the block's width in a column group
        self.offset = val.storage_offset()

    def steps(self) -> tuple:
        """What must be equal for projections to merge besides X: the weight-side steps, the
        consumer, the dtype, and the weight's row stride."""
        chain = tuple((n.target, _hashable(n.args[1:])) for n in self.chain)
        return (chain, self.consumer.target, _val(self.weight).dtype, self.row_stride)

    @property
    def storage(self) -> int:
        return _val(self.weight).untyped_storage()._cdata  # the StorageImpl: shared by views of one buffer


_X_STEPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default, _CONVERT)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _canonical(x: torch.fx.Node) -> tuple:
    """X as (source node, steps from it): branches that each re-derive X from one tensor agree."""
    steps = []
    while isinstance(x, torch.fx.Node) and x.target in _X_STEPS:
        steps.append((x.target, _hashable(x.args[1:])))
        x = x.args[0]
    return (x, tuple(reversed(steps)))


def _find(weight: torch.fx.Node) -> _Projection | None:
    val = _val(weight)
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or val.stride(1) != 1 or val.stride(0) < val.shape[1]:
        return None  # row-major, contiguous or a column slice of a wider block
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


def _runs(found: list[_Projection], step) -> list[list[_Projection]]:
    """Runs (of two or more) of projections, in storage order, each starting where the one
    before it ends by ``step(previous)`` elements."""
    found = sorted(found, key=lambda p: p.offset)
    runs, run = [], [found[0]]
    for p in found[1:]:
        if p.offset == run[-1].offset + step(run[-1]):
            run.append(p)
            continue
        if len(run) > 1:
            runs.append(run)
        run = [p]
    if len(run) > 1:
        runs.append(run)
    return runs


def _projections(graph: torch.fx.Graph) -> list[_Projection]:
    return [p for p in (_find(n) for n in graph.nodes if n.op == "placeholder") if p is not None]


def _row_groups(projections: list[_Projection]) -> list[list[_Projection]]:
    """Projections of one X whose contiguous weights tile one storage row-wise without gaps."""
    by_key: dict[tuple, list[_Projection]] = {}
    for p in projections:
        if p.row_stride == p.cols:
            by_key.setdefault((_canonical(p.x), p.steps(), p.storage), []).append(p)
    return [run for found in by_key.values() for run in _runs(found, lambda p: p.rows * p.cols)]


def _summed_value(p: _Projection) -> tuple[list[torch.fx.Node], torch.fx.Node, torch.fx.Node] | None:
    """(view steps from p's output, the value they end in, the add that consumes it), where the
    output reaches one add through single-use views alone."""
    node, views = p.output, []
    while (user := _single_user(node)) is not None and user.target in _VIEWS:
        views.append(user)
        node = user
    add = _single_user(node)
    if add is None or add.target != aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return None
    return views, node, add


class _ColumnPair(NamedTuple):
    first: _Projection  # its weight starts the block row
    second: _Projection
    views: list  # the view steps from first's output to the summed shape
    residual: torch.fx.Node  # what the first add adds the first projection output to
    outer: torch.fx.Node  # the add that yields residual + both outputs


def _column_pairs(projections: list[_Projection]) -> list[_ColumnPair]:
    """Two projections whose weights are the two column halves of one block and whose outputs
    are added into one sum: ``(r + first) + second`` or ``(r + second) + first`` (either operand
    order), with the inner add feeding nothing else and no broadcasting."""
    by_key: dict[tuple, list[_Projection]] = {}
    for p in projections:
        if p.row_stride > p.cols:
            by_key.setdefault((p.steps(), p.storage, p.rows), []).append(p)
    pairs = []
    for found in by_key.values():
        for run in _runs(found, lambda p: p.cols):
            if len(run) != 2 or run[0].offset % run[0].row_stride or sum(p.cols for p in run) != run[0].row_stride:
                continue  # exactly one whole block row
            summed = [_summed_value(p) for p in run]
            if None in summed or _val(run[0].x).shape[:1] != _val(run[1].x).shape[:1]:
                continue
            (views, value_a, add_a), (_, value_b, add_b) = summed
            for (inner, inner_value), (outer, outer_value) in (((add_a, value_a), (add_b, value_b)),
                                                                 ((add_b, value_b), (add_a, value_a))):
                others = [a for a in inner.args if a is not inner_value]
                if (_single_user(inner) is outer and len(others) == 1 and set(outer.args) == {inner, outer_value}
                        and _val(others[0]) is not None and _val(others[0]).shape == _val(outer).shape):
                    pairs.append(_ColumnPair(run[0], run[1], views, others[0], outer))
                    break
    return pairs


def _call(graph: torch.fx.Graph, target, args) -> torch.fx.Node:
    node = graph.call_function(target, args)
    _set_fake_val(node)
    return node


def _block_matmul(graph: torch.fx.Graph, first: _Projection, shape: list, x: torch.fx.Node) -> torch.fx.Node:
    """``first``'s matmul form (weight steps, mm or mul + sum, cast back) over the ``shape``
    block of weights that starts at ``first``'s weight, reading ``x``."""
    node = _call(graph, aten.as_strided.default, (first.weight, shape, [first.row_stride, 1], first.offset))
    for link in first.chain:
        node = _call(graph, link.target, (node, *link.args[1:]))
    node = _call(graph, first.consumer.target, (x, node))
    if first.consumer.target == aten.mul.Tensor:  # the GEMV decomposition: sum over K
        total = _single_user(first.consumer)
        node = _call(graph, total.target, (node, *total.args[1:]))
    if first.output.target == _CONVERT:  # a cast back after the matmul
        node = _call(graph, first.output.target, (node, *first.output.args[1:]))
    return node


def _merge_rows(graph: torch.fx.Graph, group: list[_Projection], order: dict) -> None:
    first = group[0]  # lowest storage offset: the merged block starts at its weight
    # Insert before the group's earliest consumer, reading that branch's X (every branch's X
    # has the same value, and that one is defined before this point).
    earliest = min(group, key=lambda p: order[p.consumer])
    with graph.inserting_before(earliest.consumer):
        merged = _block_matmul(graph, first, [sum(p.rows for p in group), first.cols], earliest.x)
        start = 0
        for p in group:
            piece = _call(graph, aten.slice.Tensor, (merged, 1, start, start + p.rows))
            start += p.rows
            p.output.replace_all_uses_with(piece)


def _merge_columns(graph: torch.fx.Graph, pair: _ColumnPair) -> None:
    """``r + first(X1) + second(X2)`` -> ``r + block @ cat(X1, X2)``; K is dim 1 of X in both
    forms (``(M, K)`` for mm, ``(M, K, 1)`` for the GEMV decomposition)."""
    first = pair.first
    with graph.inserting_before(pair.outer):
        x = _call(graph, aten.cat.default, ([first.x, pair.second.x], 1))
        node = _block_matmul(graph, first, [first.rows, first.row_stride], x)
        for view in pair.views:
            node = _call(graph, view.target, (node, *view.args[1:]))
        total = _call(graph, aten.add.Tensor, (pair.residual, node))
    pair.outer.replace_all_uses_with(total)


def merge_projections(graph: torch.fx.Graph) -> int:
    """Rewrite every mergeable group; returns the number of groups merged."""
    # The passes before this one leave their replacements where their patterns began: order the
    # graph first (this pass inserts relative to node order), then drop dead users (e.g. casts a
    # decomposition left), which would hide single-use chains.
    stable_topological_sort(graph)
    graph.eliminate_dead_code()
    projections = _projections(graph)
    rows, columns = _row_groups(projections), _column_pairs(projections)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for group in rows:
        _merge_rows(graph, group, order)
    for pair in columns:
        _merge_columns(graph, pair)
    if rows or columns:
        graph.eliminate_dead_code()
    return len(rows) + len(columns)
