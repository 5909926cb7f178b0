"""Is an attention-mask node in a compiled graph plain causality?

Under ``torch.compile`` Hugging Face always hands SDPA a materialised mask, also when the caller
gave no ``attention_mask`` and nothing is cached: then the mask is built from sizes alone
(``arange`` comparisons), and it is the causal triangle. Attention with ``is_causal`` is much
faster there (FlashAttention on CUDA), but the graph only shows a tensor.

The mask's inputs are checked first: it may depend on sizes (SymInt inputs, or the ``sym_size``
of a tensor input) and on constants, never on tensor data (a padding mask is data). Such a mask
is a function of the sizes only, so it is computed for real, at the compile-time size hints and
again with every size 3 larger, and accepted only if both are square causal triangles (a
sliding window, a cache prefix or bidirectional attention shows at one of them).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

aten = torch.ops.aten
_SIZE_OPS = (aten.sym_size.int, aten.sym_size.default) if hasattr(aten.sym_size, "default") else (aten.sym_size.int,)
GROWTH = 3  # the second evaluation grows every size by this
BLOCKED_BIAS = -1e4  # an additive mask entry at or below this masks (see _is_causal_triangle)


def _ancestors(node: torch.fx.Node) -> list[torch.fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for inp in stack.pop().all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return [n for n in node.graph.nodes if n in seen]  # graph order: inputs first


def _size_only(placeholder: torch.fx.Node, inside: set) -> bool:
    """A tensor input whose data the mask never reads (only its sizes)."""
    return all(u.target in _SIZE_OPS for u in placeholder.users if u in inside)


def _symbols(values) -> dict:
    """sympy symbol -> its compile-time hint, for every symbol in these values' sizes."""
    hints = {}
    for v in values:
        sizes = [v] if isinstance(v, torch.SymInt) else (list(v.shape) if isinstance(v, torch.Tensor) else [])
        for s in sizes:
            if isinstance(s, torch.SymInt):
                shape_env = s.node.shape_env
                hint_of = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val  # 2.13 / 2.11
                for sym in s.node.expr.free_symbols:
                    hints[sym] = int(hint_of[sym])
    return hints


def _concrete(size, assignment: dict) -> int:
    return int(size.node.expr.xreplace(assignment)) if isinstance(size, torch.SymInt) else int(size)


def _evaluate(nodes: list[torch.fx.Node], assignment: dict):
    env = {}
    for n in nodes:
        val = n.meta.get("val")
        if n.op == "placeholder":
            if isinstance(val, torch.Tensor):
                env[n] = torch.empty([_concrete(s, assignment) for s in val.shape], dtype=val.dtype, device="meta")
            else:
                env[n] = _concrete(val, assignment)
        elif n.op == "get_attr":
            env[n] = getattr(n.graph.owning_module, n.target)
        elif n.op == "call_function":
            args, kwargs = torch.fx.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
        else:
            raise ValueError(f"unexpected node {n.op}")
    return env[nodes[-1]]


def _is_causal_triangle(mask: torch.Tensor) -> bool:
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    n = mask.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == below).all())
    # additive: 0 where attended, a large negative bias elsewhere. HF writes -inf on CPU and a
    # finite one on CUDA (-65536 in bf16 there); any bias <= BLOCKED_BIAS zeroes its softmax
    # weight in fp32 (exp(-1e4) underflows) for every score range a trained model produces
    allowed = mask == 0
    blocked = mask <= BLOCKED_BIAS
    return bool((allowed == below).all() and (blocked == ~below).all())


def is_plain_causal(mask: torch.fx.Node) -> bool:
    """True if ``mask`` is computed from sizes alone and is the square causal triangle."""
    cached = mask.meta.get("cohere_plain_causal")
    if cached is not None:
        return cached
    nodes = _ancestors(mask)
    inside = set(nodes)
    ok = True
    for n in nodes:
        val = n.meta.get("val")
        if n.op == "placeholder":
            tensor = isinstance(val, torch.Tensor)
            if not (isinstance(val, (int, torch.SymInt)) or (tensor and _size_only(n, inside))):
                ok = False
        elif n.op not in ("call_function", "get_attr"):
            ok = False
        if not ok:
            break
    if ok:
        try:
            hints = _symbols(n.meta.get("val") for n in nodes if n.op == "placeholder")
            grown = {sym: value + GROWTH for sym, value in hints.items()}
            with unset_fake_temporarily():
                ok = all(_is_causal_triangle(_evaluate(nodes, a)) for a in (hints, grown))
        except Exception:  # noqa: BLE001  (an op we cannot run here: not provably causal, leave it)
            ok = False
    mask.meta["cohere_plain_causal"] = ok
    return ok
