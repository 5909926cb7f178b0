"""``paged_attention``: decode attention over the paged KV cache -> ``cohere::paged_attention``.

``PagedKVCache.update`` hands Hugging Face's attention dense K/V built by
``cohere::paged_gather`` (a copy of every cached position). For a decode step (one
query token per sequence) we replace the attention core fed by two such gathers -
SDPA's lowered op, HF eager attention, or our own ``flash_attention`` if the
``attention`` pass ran first - with ``cohere::paged_attention``, which reads the pool
through the block table, stops at each sequence's length and never builds the dense
copy; the gathers then have no users and are removed.

Prefill (more than one query token) is left as it is: the gather costs little next to
the prefill's own attention and matmuls.
"""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass

from . import attention

NAME = "paged_attention"

_GATHER = torch.ops.cohere.paged_gather.default
_FLASH = torch.ops.cohere.flash_attention.default


def _is_gather(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is _GATHER


def _paged_decode(q, k, v) -> bool:
    """K and V gathered from the paged cache with the same table and lengths, one query token."""
    if not (_is_gather(k) and _is_gather(v)) or k.args[1:] != v.args[1:]:
        return False
    q_val = attention._val(q)
    return q_val is not None and q_val.dim() == 4 and q_val.shape[2] == 1


def _eager_is_paged_decode(match) -> bool:
    kw = match.kwargs
    return attention._scale_is_float(match) and _paged_decode(kw["q"], kw["k"], kw["v"])


def rewrite_flash_over_gathers(graph: torch.fx.Graph) -> int:
    """``flash_attention(q, gather(Kpool), gather(Vpool), mask)`` -> ``paged_attention``."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _FLASH:
            continue
        q, k, v, mask, scale, is_causal = node.args
        # is_causal with one query is SDPA's upper-left alignment (sees key 0 only): not ours
        if is_causal or not _paged_decode(q, k, v):
            continue
        _, table, lens, _ = k.args
        with graph.inserting_before(node):
            new = graph.call_function(
                torch.ops.cohere.paged_attention.default,
                (q, k.args[0], v.args[0], table, lens, mask, float(scale)),
            )
        attention._set_fake_val(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


def build() -> list:
    eager = PatternMatcherPass(pass_name="eager_paged_attention")
    attention.register_eager_patterns(eager, extra_check=_eager_is_paged_decode)
    # The first two stages produce flash_attention nodes over the gathers (only where the
    # third will take them); the third counts the rewrites, so they return 0.
    return [
        lambda graph: attention.rewrite_sdpa(graph, accept=_paged_decode) and 0,
        lambda graph: eager.apply(graph) and 0,
        rewrite_flash_over_gathers,
    ]
