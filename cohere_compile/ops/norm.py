"""``cohere::layer_norm`` and ``cohere::add3_layer_norm`` (residual adds + norm).

Each has a ``*_tensor_eps`` twin taking eps as a 0-d tensor, for graphs compiled
with ``dynamic=True`` where the module's float epsilon is a graph input.
"""

from typing import Optional

import torch

from ..kernels import layer_norm as kernel
from . import reference
from ._dispatch import check_inputs, eps_value, use_triton


def _layer_norm(x, weight, eps):
    check_inputs("cohere::layer_norm", x, weight)
    eps = eps_value(eps)
    if use_triton(x):
        return kernel.layer_norm(x.contiguous(), weight.contiguous(), eps)
    return reference.layer_norm(x, weight, eps).contiguous()


def _layer_norm_fake(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _add3_layer_norm(residual, attn, mlp, weight, eps):
    check_inputs("cohere::add3_layer_norm", residual, attn, mlp, weight)
    eps = eps_value(eps)
    if use_triton(residual):
        return kernel.add3_layer_norm(
            residual.contiguous(), attn.contiguous(), mlp.contiguous(), weight.contiguous(), eps
        )
    h, out = reference.add3_layer_norm(residual, attn, mlp, weight, eps)
    return h.contiguous(), out.contiguous()


def _add3_layer_norm_fake(residual, attn, mlp, weight, eps):
    return _layer_norm_fake(residual, weight, eps), _layer_norm_fake(residual, weight, eps)


@torch.library.custom_op("cohere::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _layer_norm(x, weight, eps)


@torch.library.custom_op("cohere::layer_norm_tensor_eps", mutates_args=())
def layer_norm_tensor_eps(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return _layer_norm(x, weight, eps)


@torch.library.custom_op("cohere::add3_layer_norm", mutates_args=())
def add3_layer_norm(
    residual: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _add3_layer_norm(residual, attn, mlp, weight, eps)


@torch.library.custom_op("cohere::add3_layer_norm_tensor_eps", mutates_args=())
def add3_layer_norm_tensor_eps(
    residual: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _add3_layer_norm(residual, attn, mlp, weight, eps)


for _op in (layer_norm, layer_norm_tensor_eps):
    _op.register_fake(_layer_norm_fake)
for _op in (add3_layer_norm, add3_layer_norm_tensor_eps):
    _op.register_fake(_add3_layer_norm_fake)


# ---------------------------------------------------------------- backward
# One backward (and its tensor-eps twin) serves all four forward ops: ``grad_h`` (the
# grad of add3's residual-sum output) is None for plain layer_norm. Mean and rstd are
# recomputed in the kernel, so the forward saves only its inputs (add3: its sum h).


def _layer_norm_backward(grad_out, x, weight, eps, grad_h):
    check_inputs("cohere::layer_norm_backward", grad_out, x, weight, grad_h)
    eps = eps_value(eps)
    if use_triton(x):
        return kernel.layer_norm_backward(grad_out, x, weight, eps, grad_h)
    dx, dw = reference.layer_norm_backward(grad_out, x, weight, eps, grad_h)
    return dx.contiguous(), dw.contiguous()


def _layer_norm_backward_fake(grad_out, x, weight, eps, grad_h):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(
        weight.shape, dtype=weight.dtype, device=weight.device
    )


@torch.library.custom_op("cohere::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, grad_h: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` with ``dx = grad_h + (d layer_norm / dx)^T grad_out``."""
    return _layer_norm_backward(grad_out, x, weight, eps, grad_h)


@torch.library.custom_op("cohere::layer_norm_backward_tensor_eps", mutates_args=())
def layer_norm_backward_tensor_eps(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, grad_h: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return _layer_norm_backward(grad_out, x, weight, eps, grad_h)


for _op in (layer_norm_backward, layer_norm_backward_tensor_eps):
    _op.register_fake(_layer_norm_backward_fake)


def _save(ctx, x, weight, eps):
    """A tensor eps (dynamic=True) stays a tensor: reading it here would break tracing."""
    ctx.eps_is_tensor = isinstance(eps, torch.Tensor)
    if ctx.eps_is_tensor:
        ctx.save_for_backward(x, weight, eps)
    else:
        ctx.eps = eps
        ctx.save_for_backward(x, weight)


def _run_backward(ctx, grad_out, grad_h):
    if ctx.eps_is_tensor:
        x, weight, eps = ctx.saved_tensors
        if ctx.needs_input_grad[-1]:
            raise RuntimeError("cohere layer norm: eps has no gradient; pass it without requires_grad")
        return torch.ops.cohere.layer_norm_backward_tensor_eps(grad_out, x, weight, eps, grad_h)
    x, weight = ctx.saved_tensors
    return torch.ops.cohere.layer_norm_backward(grad_out, x, weight, ctx.eps, grad_h)


def _setup_layer_norm(ctx, inputs, output):
    x, weight, eps = inputs
    _save(ctx, x, weight, eps)


def _backward_layer_norm(ctx, grad_out):
    dx, dw = _run_backward(ctx, grad_out, None)
    return dx, dw, None


def _setup_add3(ctx, inputs, output):
    *_, weight, eps = inputs
    _save(ctx, output[0], weight, eps)  # the residual sum h: the adds are not redone


def _backward_add3(ctx, grad_h, grad_out):
    dx, dw = _run_backward(ctx, grad_out, grad_h)
    return dx, dx, dx, dw, None


for _op in (layer_norm, layer_norm_tensor_eps):
    _op.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)
for _op in (add3_layer_norm, add3_layer_norm_tensor_eps):
    _op.register_autograd(_backward_add3, setup_context=_setup_add3)
