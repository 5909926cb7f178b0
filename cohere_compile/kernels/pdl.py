"""Programmatic Dependent Launch (PDL, Hopper and later) for our own decode kernels.

With PDL a kernel may be launched while the kernel before it on the stream is still running:
its programs start, and wait at ``griddepcontrol.wait`` until that kernel has finished and its
writes are visible. So a kernel that waits before its first memory access stays correct, and
the launch latency and ramp-up that otherwise sit between two short kernels overlap the
previous kernel's tail. Inductor does this for its own kernels (``triton.enable_pdl``); the
decode step's custom-op kernels (norm, RoPE + cache write, paged attention, SwiGLU, int4 GEMV)
launched without it, so every one of them broke the overlap.

Every kernel that takes part calls ``wait_then_release(PDL)`` as its first statement:
``gdc_wait`` (before any load or store: writes must wait too, the previous kernel may still be
reading the buffer), then ``gdc_launch_dependents`` (the next kernel may be launched now; it
will itself wait). Correctness is transitive: a kernel can only finish after its own wait, so
the wait also covers every kernel before. The one exception, the int4 M=1 GEMV, reads only model
constants (its first step of weights) before the wait; tests/test_pdl.py checks both rules.

Off unless asked for: ``launches(True)`` turns it on for the launches inside it (cc.generate's
CUDA decode step, which CUDA graphs capture with the PDL edges), and only on CUDA devices of
compute capability 9.0 or newer outside Triton's interpreter (which has no ``griddepcontrol``).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import triton
import triton.language as tl

from . import interpreting

_REQUESTED = contextvars.ContextVar("cohere_compile_pdl", default=False)


@contextlib.contextmanager
def launches(enabled: bool = True):
    """Launch our PDL-aware kernels with PDL inside this block (where the device supports it)."""
    token = _REQUESTED.set(bool(enabled))
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def requested() -> bool:
    return _REQUESTED.get()


def supported(device: torch.device) -> bool:
    """PDL needs a CUDA device of compute capability >= 9.0 and compiled (not interpreted) Triton."""
    if device.type != "cuda" or interpreting() or torch.version.hip:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a PDL-aware kernel's launch: the ``PDL`` constexpr (the kernel's
    wait and release) and Triton's ``launch_pdl`` (the launch attribute), both on or both off."""
    on = requested() and supported(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """The first statement of a PDL-aware kernel: wait for the previous kernel, then let the next
    one launch. Compiled out when ``PDL`` is False."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
