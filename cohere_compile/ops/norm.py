"""``cohere::layer_norm`` and ``cohere::add3_layer_norm`` (residual adds + norm).

Each has a ``*_tensor_eps`` twin taking eps as a 0-d tensor, for graphs compiled
with ``dynamic=True`` where the module's float epsilon is a graph input.
"""

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
