"""``cohere::swiglu``: ``silu(gate) * up`` in one pass."""

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
