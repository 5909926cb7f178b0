"""Plain-torch definitions of every ``cohere::`` op.

They mirror Hugging Face's Cohere code step for step (same dtypes, same rounding
points), serve as the CPU path when Triton is not interpreting, and are the
references the kernel tests compare against.
"""

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return (weight.float() * ((xf - mean) * torch.rsqrt(var + eps))).to(x.dtype)


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


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    """q: (B, Hq, T, D), k: (B, Hk, T, D). Per-head LayerNorm (weights (H, D)) when
    weights are given, then RoPE; the norm sees (B, T, H, D) as HF applies it."""
    if q_weight is not None:
        q = layer_norm(q.transpose(1, 2), q_weight, eps).transpose(1, 2)
        k = layer_norm(k.transpose(1, 2), k_weight, eps).transpose(1, 2)
    return rope(q, cos, sin), rope(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


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
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    q_len, kv_len = scores.shape[-2:]
    visible = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        mask_visible, bias = visible_and_bias(mask)
        visible = visible & mask_visible
        scores = scores + bias
    if is_causal:
        visible = visible & torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(v.dtype)
    return torch.matmul(probs.float(), v.float()).to(q.dtype)


def linear_cross_entropy(hidden, weight, labels, scale: float, ignore_index: int = -100, reduction: str = "mean"):
    """Hugging Face's Cohere LM head + ``ForCausalLMLoss`` on already-shifted labels: logits in
    the input dtype, scaled, upcast to fp32, cross-entropy (``sum`` or ``mean`` over the
    non-ignored rows). Materialises every logit: the definition, not the fast path."""
    logits = torch.nn.functional.linear(hidden, weight) * scale
    logits = logits.float().reshape(-1, weight.shape[0])
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
