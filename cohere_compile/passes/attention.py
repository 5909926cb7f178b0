"""``attention``: the attention core -> ``cohere::flash_attention`` with native GQA, or, where the
mask is plain causality over a block without history (no padding, no cache: HF's mask built
from sizes alone, ``causal_mask.py``), ``cohere::causal_attention`` (SDPA with ``is_causal``:
FlashAttention on CUDA).

Three graph shapes reach us:
- HF ``sdpa``: by the joint graph SDPA is already lowered to a device-specific aten
  op (``_scaled_dot_product_flash_attention_for_cpu`` on CPU; flash / efficient /
  cuDNN on CUDA). We rewrite any of them whose extra outputs (log-sum-exp, seeds)
  are unused, i.e. inference graphs.
- HF ``sdpa`` in training: the lowered forward and its backward, as a pair ->
  ``cohere::flash_attention_lse`` + ``cohere::flash_attention_backward`` (a plain causal mask
  becomes the kernels' ``is_causal``).
- HF ``eager``: matmul -> scale -> + mask -> fp32 softmax -> cast -> matmul, matched
  as a traced pattern (inference graphs only).
In all, HF's ``repeat_kv`` (unsqueeze -> expand -> clone -> view) in front of K and V
is peeled off, so the kernel reads each KV head once for its whole query group.
"""

import operator

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass, stable_topological_sort
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._patterns import SCALE_PLACEHOLDER, register
from .causal_mask import is_plain_causal

NAME = "attention"
aten = torch.ops.aten

# SDPA lowerings -> the name of their mask argument (None: they take no mask)
_SDPA_TARGETS = {
    "_scaled_dot_product_flash_attention_for_cpu": "attn_mask",
    "_scaled_dot_product_flash_attention": None,
    "_scaled_dot_product_efficient_attention": "attn_bias",
    "_scaled_dot_product_cudnn_attention": "attn_bias",
}


def _sdpa_overloads():
    ops = {}
    for name, mask_arg in _SDPA_TARGETS.items():
        packet = getattr(aten, name, None)
        if packet is not None:
            ops[packet.default] = mask_arg
    return ops


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def peel_repeat_kv(node: torch.fx.Node) -> torch.fx.Node:
    """Return the un-repeated KV tensor behind HF's ``repeat_kv``, or ``node`` itself."""
    view = node
    if view.op != "call_function" or view.target not in (aten.view.default, aten.reshape.default,
                                                         aten._unsafe_view.default):
        return node
    src = view.args[0]
    if isinstance(src, torch.fx.Node) and src.target == aten.clone.default:
        src = src.args[0]
    if not (isinstance(src, torch.fx.Node) and src.target == aten.expand.default):
        return node
    unsq = src.args[0]
    if not (isinstance(unsq, torch.fx.Node) and unsq.target == aten.unsqueeze.default and unsq.args[1] == 2):
        return node
    kv = unsq.args[0]
    kv_val, out_val = _val(kv), _val(node)
    if kv_val is None or out_val is None or kv_val.dim() != 4:
        return node
    # (B, Hkv, S, D) repeated to (B, Hkv * n_rep, S, D): same batch, length, head_dim
    if kv_val.shape[0] != out_val.shape[0] or kv_val.shape[2:] != out_val.shape[2:]:
        return node
    return kv


def _plain_causal(mask, is_causal: bool, q_val, k_val) -> bool:
    """Attention that is exactly causal over a block without history: HF's size-only mask
    (no padding, no cache prefix; see causal_mask.py), or no mask with ``is_causal`` and Q == K."""
    if mask is None:
        return is_causal and statically_known_true(q_val.shape[2] == k_val.shape[2])
    return not is_causal and isinstance(mask, torch.fx.Node) and is_plain_causal(mask)


def rewrite_sdpa(graph: torch.fx.Graph, accept=None, causal_only: bool = False) -> int:
    """Replace lowered SDPA nodes whose only used output is the attention result
    (and, when given, for which ``accept(q, k, v)`` holds, K/V with repeat_kv peeled).
    ``causal_only``: only those with a materialised mask that is plain causality (the
    ``causal_attention`` pass; SDPA that is already ``is_causal`` without a mask stays)."""
    targets = _sdpa_overloads()
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        mask_arg = targets[node.target]
        schema_args = node.target._schema.arguments
        bound = {a.name: a.default_value if a.has_default_value() else None for a in schema_args}
        bound.update(zip((a.name for a in schema_args), node.args))
        bound.update(node.kwargs)
        if bound.get("dropout_p") not in (None, 0.0):
            continue
        users = list(node.users)
        if not all(u.target is operator.getitem for u in users):
            continue
        if any(u.args[1] != 0 and u.users for u in users):
            continue  # log-sum-exp etc. are consumed (a backward needs them): training graph
        q, k, v = bound["query"], peel_repeat_kv(bound["key"]), peel_repeat_kv(bound["value"])
        q_val, k_val = _val(q), _val(k)
        if q_val is None or k_val is None or q_val.shape[1] % k_val.shape[1]:
            continue
        if accept is not None and not accept(q, k, v):
            continue
        mask = bound.get(mask_arg) if mask_arg else None
        is_causal = bool(bound.get("is_causal") or False)
        scale = bound.get("scale")
        if scale is None:
            scale = q_val.shape[-1] ** -0.5
        causal = _plain_causal(mask, is_causal, q_val, k_val)
        if causal_only and not (causal and mask is not None):
            continue
        with graph.inserting_before(node):
            if causal:
                new = graph.call_function(torch.ops.cohere.causal_attention.default, (q, k, v, float(scale)))
            else:
                new = graph.call_function(torch.ops.cohere.flash_attention.default,
                                          (q, k, v, mask, float(scale), is_causal))
        _set_fake_val(new)
        for u in users:
            if u.args[1] == 0:
                u.replace_all_uses_with(new)
        for u in users:
            graph.erase_node(u)
        graph.erase_node(node)
        count += 1
    return count


# Training: the backwards of SDPA's lowerings. Each is paired with its forward through
# the ``out`` / ``logsumexp`` it reads; mask, scale, causality and dropout (must be 0)
# come from the forward.
_SDPA_BACKWARDS = (
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward",
)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim, aten.squeeze.dims)


def _bind(node: torch.fx.Node) -> dict:
    schema_args = node.target._schema.arguments
    bound = {a.name: a.default_value if a.has_default_value() else None for a in schema_args}
    bound.update(zip((a.name for a in schema_args), node.args))
    bound.update(node.kwargs)
    return bound


def _repeat_kv_grad_sum(node: torch.fx.Node, kv_shape) -> torch.fx.Node | None:
    """From the gradient of a repeated K/V, follow HF's repeat_kv backward (view -> sum
    over the repeat dim -> views) to the node holding the un-repeated gradient."""
    summed = False
    while len(node.users) == 1:
        (node,) = node.users
        if node.target == aten.sum.dim_IntList:
            summed = True
        elif node.target not in _VIEWS:
            return None
        val = _val(node)
        if summed and val is not None and tuple(val.shape) == tuple(kv_shape):
            return node
    return None


def _getitem(graph, node, i):
    item = graph.call_function(operator.getitem, (node, i))
    item.meta["val"] = node.meta["val"][i]
    return item


def rewrite_sdpa_training(graph: torch.fx.Graph) -> int:
    """Replace a lowered SDPA forward + its backward with ``flash_attention_lse`` +
    ``flash_attention_backward`` (with ``is_causal`` and no mask where the mask is plain
    causality, see ``_plain_causal``). Where K/V come through HF's ``repeat_kv``, the kernels
    get the un-repeated K/V and write the KV heads' gradients directly (the repeat's
    backward sum becomes dead code); if that backward chain is not recognised, the
    repeated K/V are passed instead (still correct, just not native GQA)."""
    backwards = {getattr(aten, n).default for n in _SDPA_BACKWARDS if hasattr(aten, n)}
    forwards = _sdpa_overloads()
    count = 0
    for bwd in list(graph.nodes):
        if bwd.op != "call_function" or bwd.target not in backwards:
            continue
        b = _bind(bwd)
        out_item, lse_item = b.get("out"), b.get("logsumexp")
        if not all(isinstance(n, torch.fx.Node) and n.target is operator.getitem for n in (out_item, lse_item)):
            continue
        fwd = out_item.args[0]
        if fwd is not lse_item.args[0] or fwd.target not in forwards or out_item.args[1] != 0:
            continue
        f = _bind(fwd)
        if f.get("dropout_p") not in (None, 0.0):
            continue
        fwd_users = list(fwd.users)
        if any(u.target is not operator.getitem for u in fwd_users):
            continue
        if any(u not in (out_item, lse_item) and any(x is not bwd for x in u.users) for u in fwd_users):
            continue  # another output (rng state, ...) feeds something besides this backward
        if any(x is not bwd for x in lse_item.users):
            continue
        mask_arg = forwards[fwd.target]
        mask = f.get(mask_arg) if mask_arg else None
        q, k_rep, v_rep = f["query"], f["key"], f["value"]
        k, v = peel_repeat_kv(k_rep), peel_repeat_kv(v_rep)
        q_val, k_val = _val(q), _val(k)
        if q_val is None or k_val is None or q_val.shape[1] % k_val.shape[1]:
            continue
        scale = f.get("scale")
        scale = q_val.shape[-1] ** -0.5 if scale is None else scale
        is_causal = bool(f.get("is_causal") or False)
        if _plain_causal(mask, is_causal, q_val, _val(k_rep)):
            # HF's size-only causal mask: the kernels' own causality skips the blocks above the
            # diagonal instead of reading a mask for them (H200, forward alone: 1.14-1.3x)
            mask, is_causal = None, True
        bwd_items = {u.args[1]: u for u in bwd.users if u.target is operator.getitem}
        if any(u.target is not operator.getitem for u in bwd.users):
            continue
        if any(i >= 3 and item.users for i, item in bwd_items.items()):
            continue  # the mask's gradient (efficient attention's 4th output) is used
        grad_out = b.get("grad_out", b.get("grad_out_"))
        kv_targets = {}
        if k is not k_rep or v is not v_rep:
            for i, plain in ((1, k), (2, v)):
                item = bwd_items.get(i)
                kv_targets[i] = None if item is None else _repeat_kv_grad_sum(item, _val(plain).shape)
            if any(bwd_items.get(i) is not None and kv_targets[i] is None for i in (1, 2)):
                k, v, kv_targets = k_rep, v_rep, {}  # unrecognised repeat backward: keep repeated K/V
        with graph.inserting_before(fwd):
            new_fwd = graph.call_function(
                torch.ops.cohere.flash_attention_lse.default, (q, k, v, mask, float(scale), is_causal)
            )
            _set_fake_val(new_fwd)
            new_out, new_lse = _getitem(graph, new_fwd, 0), _getitem(graph, new_fwd, 1)
        with graph.inserting_before(bwd):
            new_bwd = graph.call_function(
                torch.ops.cohere.flash_attention_backward.default,
                (grad_out, q, k, v, new_out, new_lse, mask, float(scale), is_causal),
            )
            _set_fake_val(new_bwd)
            grads = [_getitem(graph, new_bwd, i) for i in range(3)]
        for i, item in bwd_items.items():
            target = kv_targets.get(i) or item
            if i < 3:
                target.replace_all_uses_with(grads[i])
        out_item.replace_all_uses_with(new_out)
        count += 1
    if count:  # drop the SDPA pair now so later stages see no stray users; earlier
        # pattern stages may have left the graph out of order, which DCE's lint rejects
        stable_topological_sort(graph)
        graph.eliminate_dead_code()
    return count


def _set_fake_val(node: torch.fx.Node) -> None:
    """Give a hand-inserted node the ``meta['val']`` later Inductor passes rely on."""
    args, kwargs = torch.fx.map_arg((node.args, node.kwargs), _val)
    tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    with torch._guards.detect_fake_mode(tensors):
        node.meta["val"] = node.target(*args, **kwargs)


def _repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _eager_core(q, k, v, mask, scaling):
    """HF's eager_attention_forward (inference: dropout is a no-op), after repeat_kv."""
    w = torch.matmul(q, k.transpose(2, 3)) * scaling
    if mask is not None:
        w = w + mask
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def _search_gqa(q, k, v, mask, scaling):
    n_rep = q.shape[1] // k.shape[1]
    return _eager_core(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), mask, scaling)


def _search_mha(q, k, v, mask, scaling):
    return _eager_core(q, k, v, mask, scaling)


def _replace(q, k, v, mask, scaling):
    return torch.ops.cohere.flash_attention(q, k, v, mask, scaling, False)


def _scale_is_float(match) -> bool:
    return isinstance(match.kwargs.get("scaling"), float)


def register_eager_patterns(eager: PatternMatcherPass, extra_check=_scale_is_float, replacement=_replace) -> None:
    """HF eager attention (GQA and MHA, transposed or contiguous q/k/v) -> ``replacement``
    (default: flash_attention)."""
    b, h, kv, s, d = 2, 4, 2, 8, 16

    def inputs(n_kv):
        # q, k, v arrive as (B, H, S, D) views of (B, S, H, D) (HF's transpose) or
        # contiguous (after eager RoPE); matmul traces differently for each.
        def tensor(heads, transposed, dt):
            if transposed:
                return torch.randn(b, s, heads, d, dtype=dt).transpose(1, 2)
            return torch.randn(b, heads, s, d, dtype=dt)

        def variants(dt):
            return [
                [tensor(h, tq, dt), tensor(n_kv, tk, dt), tensor(n_kv, tk, dt),
                 torch.randn(b, 1, s, s, dtype=dt), SCALE_PLACEHOLDER]
                for tq in (False, True) for tk in (False, True)
            ]
        return variants

    scalars = {"scaling": SCALE_PLACEHOLDER}
    register(eager, _search_gqa, replacement, inputs(kv), scalars=scalars, extra_check=extra_check)
    register(eager, _search_mha, replacement, inputs(h), scalars=scalars, extra_check=extra_check)


def build() -> list:
    eager = PatternMatcherPass(pass_name="eager_attention")
    register_eager_patterns(eager)
    return [rewrite_sdpa, rewrite_sdpa_training, eager]
