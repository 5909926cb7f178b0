"""The ``cohere`` torch.compile backend: Inductor with our pass manager installed.

``torch.compile(model, backend="cohere", options={"passes": [...], **inductor_options})``
works without importing cohere_compile (the ``torch_dynamo_backends`` entry point
in pyproject.toml). Options other than ``passes`` are Inductor config patches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx

from .passes import DEFAULT_PASSES, CoherePassManager


def split_options(options: dict[str, Any] | None) -> tuple[tuple[str, ...], bool, dict[str, Any]]:
    """-> (passes, training_rewrites, Inductor config patches)."""
    options = dict(options or {})
    passes = options.pop("passes", DEFAULT_PASSES)
    training_rewrites = bool(options.pop("training_rewrites", False))
    if isinstance(passes, str):
        passes = [passes]
    unknown = [k for k in options if not hasattr(inductor_config, k)]
    if unknown:
        raise ValueError(
            f"cohere backend: unknown option(s) {unknown}; use 'passes', 'training_rewrites' or an Inductor config name "
            f"(torch._inductor.config)"
        )
    return tuple(passes), training_rewrites, options


def make_backend(options: dict[str, Any] | None = None):
    """A backend callable with fixed options (what ``cc.optimize`` hands to torch.compile)."""
    passes, training_rewrites, inductor_options = split_options(options)
    manager = CoherePassManager(passes, training_rewrites)

    def cohere_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        patches = dict(inductor_options)
        patches["joint_custom_post_pass"] = manager
        return compile_fx(gm, example_inputs, config_patches=patches)

    cohere_compiler.manager = manager
    return cohere_compiler


def cohere_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **_):
    """Entry point for ``torch.compile(..., backend="cohere")``."""
    return make_backend(options)(gm, example_inputs)
