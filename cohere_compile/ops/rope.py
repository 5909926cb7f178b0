"""``cohere::qk_norm_rope``: optional per-head QK LayerNorm + interleaved RoPE on q and k."""

from typing import Optional

import torch

from ..kernels import empty_heads_like
from ..kernels import rope as kernel
from . import reference
from ._dispatch import check_inputs, eps_value, use_triton


def check_rope_args(op: str, q, k, q_weight, k_weight) -> None:
    """The QK-norm weights come as a pair (or not at all), each ``(heads, head_dim)`` of its own
    tensor, and RoPE rotates pairs of dims. The kernels index a weight by head without bounds, so
    a weight of the other tensor (k's for q under GQA) would read past its end: refuse it here,
    and in the fake implementations, so that a graph pass binding them wrongly fails at compile."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError(f"{op}: pass both q_weight and k_weight, or neither")
    if q.shape[-1] % 2:
        raise ValueError(f"{op}: head_dim must be even for RoPE, got {q.shape[-1]}")
    for name, x, w in (("q", q, q_weight), ("k", k, k_weight)):
        if w is not None and tuple(w.shape) != (x.shape[1], x.shape[-1]):
            raise ValueError(f"{op}: {name}_weight has shape {tuple(w.shape)}, but {name} has {x.shape[1]} heads of "
                             f"{x.shape[-1]}: each QK-norm weight must be (heads, head_dim) of its own tensor "
                             f"(q_norm's for q, k_norm's for k)")


def _eps_pair(eps, k_eps):
    """(q's, k's) norm epsilon as floats; k's is q's unless given."""
    eps = eps_value(eps)
    return eps, eps if k_eps is None else eps_value(k_eps)


def _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, k_eps=None):
    """q: (B, Hq, T, D), k: (B, Hk, T, D); outputs have the same shapes, laid out (B, T, H, D)."""
    check_inputs("cohere::qk_norm_rope", q, k, q_weight, k_weight, cos, sin)
    check_rope_args("cohere::qk_norm_rope", q, k, q_weight, k_weight)
    eps, k_eps = _eps_pair(eps, k_eps)
    if use_triton(q):
        return kernel.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, k_eps=k_eps)
    q_ref, k_ref = reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, k_eps)
    q_out, k_out = empty_heads_like(q), empty_heads_like(k)
    return q_out.copy_(q_ref), k_out.copy_(k_ref)


@torch.library.custom_op("cohere::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps)


@torch.library.custom_op("cohere::qk_norm_rope_tensor_eps", mutates_args=())
def qk_norm_rope_tensor_eps(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: torch.Tensor,
    k_eps: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dynamic=True`` makes each norm's eps its own graph input, so k's comes separately
    (``eps`` serves both when it is None)."""
    return _qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, k_eps)


def _fake(q, k, q_weight, k_weight, cos, sin, eps, k_eps=None):
    check_rope_args("cohere::qk_norm_rope", q, k, q_weight, k_weight)
    return empty_heads_like(q), empty_heads_like(k)


for _op in (qk_norm_rope, qk_norm_rope_tensor_eps):
    _op.register_fake(_fake)


# ---------------------------------------------------------------- backward
# Saves the op's inputs only: the rotation and the per-head mean / rstd are recomputed.


def _qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, k_eps=None):
    check_inputs("cohere::qk_norm_rope_backward", grad_q, grad_k, q, k, q_weight, k_weight, cos, sin)
    check_rope_args("cohere::qk_norm_rope_backward", q, k, q_weight, k_weight)
    eps, k_eps = _eps_pair(eps, k_eps)
    if use_triton(q):
        dq, dk, dqw, dkw = kernel.qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps,
                                                        k_eps)
    else:
        dq_ref, dk_ref, dqw, dkw = reference.qk_norm_rope_backward(
            grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, k_eps
        )
        dq, dk = empty_heads_like(q).copy_(dq_ref), empty_heads_like(k).copy_(dk_ref)
    if q_weight is None:  # custom ops cannot return None: empty stand-ins, dropped by autograd
        dqw, dkw = q.new_empty(0), k.new_empty(0)
    return dq, dk, dqw, dkw


def _backward_fake(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, k_eps=None):
    if q_weight is None:
        dqw, dkw = q.new_empty(0), k.new_empty(0)
    else:
        dqw, dkw = torch.empty_like(q_weight), torch.empty_like(k_weight)
    return empty_heads_like(q), empty_heads_like(k), dqw, dkw


@torch.library.custom_op("cohere::qk_norm_rope_backward", mutates_args=())
def qk_norm_rope_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
    cos: torch.Tensor, sin: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dq_weight, dk_weight)``; the weight grads are empty without QK norm."""
    return _qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps)


@torch.library.custom_op("cohere::qk_norm_rope_backward_tensor_eps", mutates_args=())
def qk_norm_rope_backward_tensor_eps(
    grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
    q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
    cos: torch.Tensor, sin: torch.Tensor, eps: torch.Tensor, k_eps: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, k_eps)


for _op in (qk_norm_rope_backward, qk_norm_rope_backward_tensor_eps):
    _op.register_fake(_backward_fake)


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps, *k_eps = inputs  # k_eps: the tensor twin only
    ctx.n_inputs = len(inputs)
    ctx.has_weights = q_weight is not None
    ctx.eps_is_tensor = isinstance(eps, torch.Tensor)
    saved = [q, k, cos, sin] + ([q_weight, k_weight] if ctx.has_weights else [])
    if ctx.eps_is_tensor:  # a tensor eps (dynamic=True) stays a tensor: .item() would break tracing
        saved += [eps] + [e for e in k_eps if e is not None]
    else:
        ctx.eps = eps
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_q, grad_k):
    if any(ctx.needs_input_grad[4:]):
        raise RuntimeError(
            "cohere::qk_norm_rope: no gradient for cos, sin or eps (HF computes them from a buffer); "
            "pass them without requires_grad"
        )
    saved = list(ctx.saved_tensors)
    q, k, cos, sin = saved[:4]
    q_weight, k_weight = saved[4:6] if ctx.has_weights else (None, None)
    if ctx.eps_is_tensor:
        op, eps = torch.ops.cohere.qk_norm_rope_backward_tensor_eps, saved[4 + 2 * ctx.has_weights:]
    else:
        op, eps = torch.ops.cohere.qk_norm_rope_backward, [ctx.eps]
    dq, dk, dqw, dkw = op(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, *eps)
    if not ctx.has_weights:
        dqw = dkw = None
    return (dq, dk, dqw, dkw) + (None,) * (ctx.n_inputs - 4)


for _op in (qk_norm_rope, qk_norm_rope_tensor_eps):
    _op.register_autograd(_backward, setup_context=_setup)
