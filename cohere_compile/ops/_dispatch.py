"""Which implementation an op runs, and the clear errors for inputs we do not serve."""

import contextlib

import torch

from ..kernels import interpreting

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_DEVICES = ("cpu", "cuda")


class UnsupportedInputError(TypeError):
    """An op or model got a dtype or device that cohere_compile has no path for."""


def check_inputs(op_name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type not in SUPPORTED_DEVICES:
            raise UnsupportedInputError(
                f"{op_name}: device '{t.device.type}' is not supported; cohere_compile runs on "
                f"{' and '.join(SUPPORTED_DEVICES)}. Move the model with .to('cuda') or .to('cpu')."
            )
        if t.is_floating_point() and t.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedInputError(
                f"{op_name}: dtype {t.dtype} is not supported; use float32, bfloat16 or float16 "
                f"(e.g. model.to(torch.bfloat16))."
            )


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors always take the Triton kernel; CPU tensors take it only under
    TRITON_INTERPRET=1 (the test suite), otherwise the plain-torch path."""
    return t.device.type == "cuda" or interpreting()


def eps_value(eps) -> float:
    """Norm epsilons arrive as a Python float, or (``dynamic=True`` turns module float
    attributes into graph inputs) as a 0-d CPU tensor: the ``*_tensor_eps`` op twins."""
    return float(eps.item()) if isinstance(eps, torch.Tensor) else float(eps)


# The dispatcher runs a custom op's implementation with autograd's dispatch keys excluded,
# so ``torch.enable_grad()`` alone records nothing there.
_AUTOGRAD_KEYS = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther)


@contextlib.contextmanager
def autograd_inside_op():
    """Record autograd inside a custom op's implementation: the plain-torch backward
    references differentiate their forward definitions with ``torch.autograd.grad``."""
    was = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in _AUTOGRAD_KEYS]
    for key in _AUTOGRAD_KEYS:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for key, excluded in zip(_AUTOGRAD_KEYS, was):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, excluded)
