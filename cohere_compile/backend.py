"""The ``cohere`` torch.compile backend: Inductor with our pass manager installed.

``torch.compile(model, backend="cohere", options={"passes": [...], **inductor_options})``
works without importing cohere_compile (the ``torch_dynamo_backends`` entry point
in pyproject.toml). Options other than ``passes``, ``training_rewrites`` and
``activation_memory_budget`` are Inductor config patches.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Sequence

import torch
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx

from .passes import DEFAULT_PASSES, CoherePassManager


class BackendOptions(NamedTuple):
    passes: tuple[str, ...]
    training_rewrites: bool
    merge_projections: bool  # internal: cc.generate's own compiles (passes/merge_projections.py)
    int4_split_k: bool  # one-row int4 GEMVs' split-K sum (and SwiGLU) into their neighbours (passes/int4_split_k.py)
    activation_memory_budget: float | None  # None: PyTorch's own (1.0: save what the partitioner likes)
    inductor: dict[str, Any]  # Inductor config patches


def check_activation_memory_budget(budget) -> float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget <= 1.0:
        raise ValueError(f"activation_memory_budget must be a number in [0, 1] (1 = PyTorch's default, saves the "
                         f"most; 0 = recompute the most) or None, got {budget!r}")
    return float(budget)


def split_options(options: dict[str, Any] | None) -> BackendOptions:
    options = dict(options or {})
    passes = options.pop("passes", DEFAULT_PASSES)
    training_rewrites = bool(options.pop("training_rewrites", False))
    merge = bool(options.pop("merge_projections", False))
    int4_split_k = bool(options.pop("int4_split_k", True))
    budget = check_activation_memory_budget(options.pop("activation_memory_budget", None))
    if isinstance(passes, str):
        passes = [passes]
    unknown = [k for k in options if not hasattr(inductor_config, k)]
    if unknown:
        raise ValueError(
            f"cohere backend: unknown option(s) {unknown}; use 'passes', 'training_rewrites', "
            f"'activation_memory_budget', 'int4_split_k' or an Inductor config name (torch._inductor.config)"
        )
    return BackendOptions(tuple(passes), training_rewrites, merge, int4_split_k, budget, options)


def make_backend(options: dict[str, Any] | None = None):
    """A backend callable with fixed options (what ``cc.optimize`` hands to torch.compile)."""
    opts = split_options(options)
    manager = CoherePassManager(opts.passes, opts.training_rewrites, opts.merge_projections, opts.int4_split_k)

    def cohere_compiler(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        patches = dict(opts.inductor)
        patches["joint_custom_post_pass"] = manager
        # The budget steers AOTAutograd's partitioner, which runs inside compile_fx when a
        # training graph is split into forward and backward; functorch's config is part of
        # the AOTAutograd cache key, so cached graphs of other budgets are never reused.
        budget = contextlib.nullcontext() if opts.activation_memory_budget is None else \
            functorch_config.patch(activation_memory_budget=opts.activation_memory_budget)
        with budget:
            return compile_fx(gm, example_inputs, config_patches=patches)

    cohere_compiler.manager = manager
    return cohere_compiler


def cohere_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **_):
    """Entry point for ``torch.compile(..., backend="cohere")``."""
    return make_backend(options)(gm, example_inputs)
