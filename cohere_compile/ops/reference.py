"""Plain-torch definitions of every ``cohere::`` op.

They mirror Hugging Face's Cohere code step for step (same dtypes, same rounding
points), serve as the CPU path when Triton is not interpreting, and are the
references the kernel tests compare against.
"""

import torch

from ._dispatch import autograd_inside_op


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return (weight.float() * ((xf - mean) * torch.rsqrt(var + eps))).to(x.dtype)


def layer_norm_backward(grad_out, x, weight, eps, grad_h=None):
    """fp32 autograd through ``layer_norm``; ``grad_h`` (add3's residual-sum grad) is added to dx."""
    with autograd_inside_op():
        xf = x.detach().float().requires_grad_()
        wf = weight.detach().float().requires_grad_()
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        out = wf * ((xf - mean) * torch.rsqrt(var + eps))
        dx, dw = torch.autograd.grad(out, (xf, wf), grad_out.float())
    if grad_h is not None:
        dx = dx + grad_h.float()
    return dx.to(x.dtype), dw.to(weight.dtype)


def add3_layer_norm(residual, attn, mlp, weight, eps):
    h = residual + attn + mlp
    return h, layer_norm(h, weight, eps)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B|1, T, D). Cohere's interleaved rotation in fp32."""
    xf = x.float()
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    return (xf * cos + _rotate_interleaved(xf) * sin).to(x.dtype)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, k_eps=None):
    """q: (B, Hq, T, D), k: (B, Hk, T, D). Per-head LayerNorm (weights (H, D)) when
    weights are given, then RoPE; the norm sees (B, T, H, D) as HF applies it.
    ``k_eps``: k's norm epsilon, ``eps`` unless given."""
    if q_weight is not None:
        q = layer_norm(q.transpose(1, 2), q_weight, eps).transpose(1, 2)
        k = layer_norm(k.transpose(1, 2), k_weight, eps if k_eps is None else k_eps).transpose(1, 2)
    return rope(q, cos, sin), rope(k, cos, sin)


def qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, k_eps=None):
    """Autograd through ``qk_norm_rope`` (the definition above, same rounding points)."""
    with autograd_inside_op():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (q, k, q_weight, k_weight)]
        q_out, k_out = qk_norm_rope(*leaves, cos, sin, eps, k_eps)
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((q_out, k_out), wanted, (grad_q, grad_k))
    return (*grads, None, None) if q_weight is None else tuple(grads)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def swiglu_backward(grad_out, gate, up):
    """What eager autograd computes for ``silu(gate) * up`` (same rounding points)."""
    d_up = grad_out * torch.nn.functional.silu(gate)
    d_act = grad_out * up
    sig = torch.sigmoid(gate.float())
    d_gate = d_act.float() * sig * (1 + gate.float() * (1 - sig))
    return d_gate.to(gate.dtype), d_up.to(up.dtype)


def visible_and_bias(mask):
    """Split a bool (True = attend) or additive float mask into what is visible and
    the bias added to visible scores. Values at or below half the dtype's most
    negative number (HF writes ``finfo.min``) count as masked."""
    if mask.dtype == torch.bool:
        return mask, torch.zeros((), device=mask.device)
    visible = mask > torch.finfo(mask.dtype).min / 2
    return visible, torch.where(visible, mask.float(), 0.0)


def flash_attention(q, k, v, mask, scale: float, is_causal: bool):
    """Softmax attention with GQA by repetition (the definition, not the fast path).
    A query row that sees no key returns zeros."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 math, fp64 when the test asks
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    q_len, kv_len = scores.shape[-2:]
    visible = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        mask_visible, bias = visible_and_bias(mask)
        visible = visible & mask_visible
        scores = scores + bias.to(acc)
    if is_causal:
        visible = visible & torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)
    return torch.matmul(probs.to(acc), v.to(acc)).to(q.dtype)


def paged_gather(pool, block_table, kv_lens, view_len: int):
    """Dense (B, Hkv, view_len, D) keys or values of each sequence; positions at or past
    ``kv_lens[b]`` (and unallocated blocks, table entry -1) read as zeros."""
    n_blocks, hkv, block_size, d = pool.shape
    b, max_blocks = block_table.shape
    n_view_blocks = -(-view_len // block_size)
    table = block_table[:, :n_view_blocks].long()
    dense = pool[table.clamp(min=0)]  # (B, nb, Hkv, bs, D)
    dense = dense.permute(0, 2, 1, 3, 4).reshape(b, hkv, n_view_blocks * block_size, d)[:, :, :view_len]
    pos = torch.arange(view_len, device=pool.device)
    valid = pos[None, :] < kv_lens[:, None].to(pos.dtype)
    return dense * valid[:, None, :, None].to(dense.dtype)


def paged_write(k_pool, v_pool, k, v, slots):
    """Scatter k, v (B, Hkv, T, D) into the pools at flat slots (B, T); -1 = skip."""
    n_blocks, hkv, block_size, d = k_pool.shape
    flat = slots.reshape(-1).long()
    keep = flat >= 0
    rows_k = k.permute(0, 2, 1, 3).reshape(-1, hkv, d)[keep]
    rows_v = v.permute(0, 2, 1, 3).reshape(-1, hkv, d)[keep]
    blk, off = flat[keep] // block_size, flat[keep] % block_size
    k_pool[blk, :, off] = rows_k.to(k_pool.dtype)
    v_pool[blk, :, off] = rows_v.to(v_pool.dtype)


def paged_attention(q, k_pool, v_pool, block_table, kv_lens, mask, scale: float):
    """Attention of q (B, H, Q, D) over each sequence's first ``kv_lens[b]`` cached positions
    (by gathering them densely), with an optional mask over the block table's view."""
    view_len = block_table.shape[1] * k_pool.shape[2]
    k = paged_gather(k_pool, block_table, kv_lens, view_len)
    v = paged_gather(v_pool, block_table, kv_lens, view_len)
    in_range = torch.arange(view_len, device=q.device)[None, :] < kv_lens[:, None].to(torch.long)
    visible = in_range[:, None, None, :]
    if mask is not None:
        mask_visible, bias = visible_and_bias(mask)
        visible = visible & mask_visible[..., :view_len]
        bias = bias[..., :view_len] if bias.dim() else bias
        mask = torch.where(visible, bias, float("-inf"))
    else:
        mask = torch.where(visible, 0.0, float("-inf"))
    return flash_attention(q, k, v, mask.float(), scale, False)


def flash_attention_lse(q, k, v, mask, scale: float, is_causal: bool):
    """``flash_attention`` and its log-sum-exp in log2 units (-inf where a row sees nothing)."""
    n_rep = q.shape[1] // k.shape[1]
    kr = k.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q.float(), kr.float().transpose(-1, -2)) * scale
    q_len, kv_len = scores.shape[-2:]
    visible = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        mask_visible, bias = visible_and_bias(mask)
        visible = visible & mask_visible
        scores = scores + bias
    if is_causal:
        visible = visible & torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1) * 1.4426950408889634
    return flash_attention(q, k, v, mask, scale, is_causal), lse


def flash_attention_backward(grad_out, q, k, v, mask, scale: float, is_causal: bool):
    """fp32 autograd through ``flash_attention``'s definition; grads in the inputs' dtypes."""
    with autograd_inside_op():
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*leaves, mask, scale, is_causal)
        grads = torch.autograd.grad(out, leaves, grad_out.float())
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def linear_cross_entropy(hidden, weight, labels, scale: float, ignore_index: int = -100, reduction: str = "mean"):
    """Hugging Face's Cohere LM head + ``ForCausalLMLoss`` on already-shifted labels: logits in
    the input dtype, scaled, upcast to fp32, cross-entropy (``sum`` or ``mean`` over the
    non-ignored rows). Materialises every logit: the definition, not the fast path."""
    logits = torch.nn.functional.linear(hidden, weight) * scale
    logits = logits.float().reshape(-1, weight.shape[0])
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
