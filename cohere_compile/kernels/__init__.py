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
