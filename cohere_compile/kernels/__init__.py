"""Triton kernels: pure ``@triton.jit`` functions plus small launchers.

Nothing here knows about FX or torch.library; ``cohere_compile.ops`` wraps these
launchers into custom ops. Set ``TRITON_INTERPRET=1`` *before* importing this
package to run the kernels on CPU tensors through Triton's interpreter.
"""

import os

import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(int(n))


def empty_heads_like(x):
    """An empty ``(B, H, T, D)`` tensor like ``x``, laid out as ``(B, T, H, D)``: the layout
    the projections produce, so attention outputs reshape to ``(B, T, H*D)`` for free."""
    import torch

    b, h, t, d = x.shape
    return torch.empty((b, t, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)
