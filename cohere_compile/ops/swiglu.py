"""``cohere::swiglu``: ``silu(gate) * up`` in one pass, and its backward
``cohere::swiglu_backward`` (saves gate and up only; sigmoid is recomputed)."""

import torch

from ..kernels import swiglu as kernel
from . import reference
from ._dispatch import check_inputs, use_triton


@torch.library.custom_op("cohere::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_inputs("cohere::swiglu", gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"cohere::swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if use_triton(gate):
        return kernel.swiglu(gate, up)
    return reference.swiglu(gate, up).contiguous()


@swiglu.register_fake
def _(gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("cohere::swiglu_backward", mutates_args=())
def swiglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs("cohere::swiglu_backward", grad_out, gate, up)
    if use_triton(gate):
        return kernel.swiglu_backward(grad_out, gate, up)
    d_gate, d_up = reference.swiglu_backward(grad_out, gate, up)
    return d_gate.contiguous(), d_up.contiguous()


@swiglu_backward.register_fake
def _(grad_out, gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device), torch.empty(
        up.shape, dtype=up.dtype, device=up.device
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    return torch.ops.cohere.swiglu_backward(grad_out, gate, up)


swiglu.register_autograd(_backward, setup_context=_setup_context)
