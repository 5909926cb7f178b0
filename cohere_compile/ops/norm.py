"""``cohere::layer_norm`` and ``cohere::add3_layer_norm`` (residual adds + norm)."""

import torch

from ..kernels import layer_norm as kernel
from . import reference
from ._dispatch import check_inputs, use_triton


@torch.library.custom_op("cohere::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_inputs("cohere::layer_norm", x, weight)
    if use_triton(x):
        return kernel.layer_norm(x.contiguous(), weight.contiguous(), eps)
    return reference.layer_norm(x, weight, eps).contiguous()


@layer_norm.register_fake
def _(x, weight, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("cohere::add3_layer_norm", mutates_args=())
def add3_layer_norm(
    residual: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs("cohere::add3_layer_norm", residual, attn, mlp, weight)
    if use_triton(residual):
        return kernel.add3_layer_norm(
            residual.contiguous(), attn.contiguous(), mlp.contiguous(), weight.contiguous(), eps
        )
    h, out = reference.add3_layer_norm(residual, attn, mlp, weight, eps)
    return h.contiguous(), out.contiguous()


@add3_layer_norm.register_fake
def _(residual, attn, mlp, weight, eps):
    new = lambda: torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)  # noqa: E731
    return new(), new()


__all__ = ["layer_norm", "add3_layer_norm"]
