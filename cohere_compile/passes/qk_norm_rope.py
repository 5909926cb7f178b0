"""``qk_norm_rope``: the per-head QK LayerNorm (``use_qk_norm=True``) and Cohere's
interleaved RoPE on q and k -> one ``cohere::qk_norm_rope`` launch; RoPE alone when
the model has no QK norm. One rewrite per attention layer."""

import torch
from torch._inductor.pattern_matcher import PatternMatcherPass

from ._patterns import EPS_PLACEHOLDER, EPS_PLACEHOLDER_2, meta_val, register
from .layer_norm import cohere_layer_norm

NAME = "qk_norm_rope"


def _rotate_half(x):
    """HF Cohere's rotate_half: pairs (2i, 2i+1), not Llama's halves."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack([-x2, x1], dim=-1).flatten(-2)


def apply_rotary_pos_emb(q, k, cos, sin):
    """HF Cohere's apply_rotary_pos_emb (unsqueeze_dim=1), verbatim."""
    dtype = q.dtype
    q = q.float()
    k = k.float()
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (_rotate_half(q) * sin)
    k_embed = (k * cos) + (_rotate_half(k) * sin)
    return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)


def _search_norm_rope(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps):
    """q, k: (B, T, H, D) as projected, before HF's transpose. Each norm has its own eps:
    under ``dynamic=True`` each is a separate graph input (equal values, distinct nodes)."""
    q = cohere_layer_norm(q, q_weight, q_eps).transpose(1, 2)
    k = cohere_layer_norm(k, k_weight, k_eps).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, cos, sin)


def _replace_norm_rope(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps):
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if isinstance(q_eps, torch.Tensor):
        return torch.ops.cohere.qk_norm_rope_tensor_eps(q, k, q_weight, k_weight, cos, sin, q_eps, k_eps)
    return torch.ops.cohere.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, q_eps)  # == k_eps: _eps_fit_op


def _eps_fit_op(match) -> bool:
    """Tensor epsilons (both) go to the tensor twin, which takes q's and k's; float ones to the
    one-eps op, so they must be equal (they are in HF: both are ``config.layer_norm_eps``)."""
    q_eps, k_eps = meta_val(match, "q_eps"), meta_val(match, "k_eps")
    tensors = [isinstance(e, torch.Tensor) for e in (q_eps, k_eps)]
    if all(tensors):
        return True
    return not any(tensors) and isinstance(q_eps, float) and q_eps == k_eps


def _search_rope(q, k, cos, sin):
    """q, k: (B, H, T, D)."""
    return apply_rotary_pos_emb(q, k, cos, sin)


def _replace_rope(q, k, cos, sin):
    return torch.ops.cohere.qk_norm_rope(q, k, None, None, cos, sin, 0.0)


def build() -> list[PatternMatcherPass]:
    fused, rope_only = PatternMatcherPass(pass_name=NAME), PatternMatcherPass(pass_name="rope")
    b, t, h, kv, d = 2, 3, 4, 2, 8

    def norm_inputs(dt):
        return [torch.randn(b, t, h, d, dtype=dt), torch.randn(b, t, kv, d, dtype=dt),
                torch.randn(h, d, dtype=dt), torch.randn(kv, d, dtype=dt),
                torch.randn(1, t, d, dtype=dt), torch.randn(1, t, d, dtype=dt), EPS_PLACEHOLDER, EPS_PLACEHOLDER_2]

    def rope_inputs(dt):
        return [torch.randn(b, h, t, d, dtype=dt), torch.randn(b, kv, t, d, dtype=dt),
                torch.randn(1, t, d, dtype=dt), torch.randn(1, t, d, dtype=dt)]

    register(fused, _search_norm_rope, _replace_norm_rope, norm_inputs,
             scalars={"q_eps": EPS_PLACEHOLDER, "k_eps": EPS_PLACEHOLDER_2}, extra_check=_eps_fit_op,
             grad_variants=[("q", "k", "q_weight", "k_weight"), ("q", "k")], distinct_branches=True)
    register(rope_only, _search_rope, _replace_rope, rope_inputs, grad_variants=[("q", "k")],
             distinct_branches=True)
    return [fused, rope_only]
