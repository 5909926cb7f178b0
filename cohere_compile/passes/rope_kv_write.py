"""Fuse the step's QK-norm / RoPE into the paged cache write (internal; runs where both
``qk_norm_rope`` and ``paged_attention`` are enabled, i.e. in ``cc.generate``'s graphs).

``PagedKVCache.update`` writes the rotated keys with ``cohere::paged_kv_write``; when the
``qk_norm_rope`` pass has produced those keys and nothing else reads them (decode attention
reads the pool), ``cohere::qk_norm_rope_kv_write`` rotates q and k and stores k and v into
their slots in one kernel instead of two.

The write mutates the pools, so in the graph it is an ``auto_functionalized`` (v2, or v1 on
older setups) node with the pools as bases; the fused op is the same node with another op and
more arguments, whose first result is the rotated q and whose last two are the new pools.
"""

from __future__ import annotations

import operator

import torch

from .attention import _getitem, _set_fake_val

_WRITE = torch.ops.cohere.paged_kv_write.default
_ROPE = torch.ops.cohere.qk_norm_rope.default  # float eps (decode graphs are static)
_FUSED = torch.ops.cohere.qk_norm_rope_kv_write.default
_HOPS = tuple(
    hop for hop in (getattr(torch.ops.higher_order, name, None) for name in ("auto_functionalized_v2",
                                                                              "auto_functionalized"))
    if hop is not None
)


def _rotated_k(write: torch.fx.Node):
    """(the ``qk_norm_rope`` node, which of its outputs) whose rotated tensor - and nothing
    else - feeds this write as k. The op treats its two inputs alike, so the pattern may have
    bound the model's k to either side."""
    k = write.kwargs.get("k")
    if not (isinstance(k, torch.fx.Node) and k.target is operator.getitem and len(k.users) == 1):
        return None, None
    rope = k.args[0]
    return (rope, k.args[1]) if isinstance(rope, torch.fx.Node) and rope.target is _ROPE else (None, None)


def fuse_rope_into_kv_write(graph: torch.fx.Graph) -> int:
    count = 0
    for write in list(graph.nodes):
        if write.target not in _HOPS or write.args[0] is not _WRITE:
            continue
        rope, k_index = _rotated_k(write)
        if rope is None:
            continue
        first, second, first_weight, second_weight, cos, sin, eps = rope.args
        q, k, q_weight, k_weight = ((first, second, first_weight, second_weight) if k_index == 1
                                    else (second, first, second_weight, first_weight))
        kwargs = {name: value for name, value in write.kwargs.items() if name != "k"}
        kwargs.update(q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin, eps=eps)
        with graph.inserting_before(write):
            fused = graph.call_function(write.target, (_FUSED,), kwargs)
        _set_fake_val(fused)
        with graph.inserting_after(fused):
            results = [_getitem(graph, fused, i) for i in range(len(fused.meta["val"]))]
        # the new pool values come last in both (v2 keeps a slot for the write's None result; v1 not)
        shift = len(results) - len(write.meta["val"])
        for user in list(write.users):
            user.replace_all_uses_with(results[user.args[1] + shift])
            graph.erase_node(user)
        graph.erase_node(write)
        for user in list(rope.users):  # the rotated q; the rotated k had only the write
            if user.args[1] != k_index:
                user.replace_all_uses_with(results[0])
            graph.erase_node(user)
        graph.erase_node(rope)
        count += 1
    return count
