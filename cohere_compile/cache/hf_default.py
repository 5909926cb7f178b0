"""``cc.optimize(model, paged_cache=True)`` makes ``PagedKVCache`` the default cache of Hugging Face ``generate``
(opt-in: off by default, because on the H200 it measured 0.48x HF's DynamicCache in ``model.generate``,
bench/results/hf_generate_aya-8b_L16.json; ``cc.generate`` is the fast decode path).

How: ``install`` puts a ``_prepare_cache_for_generation`` attribute on the model *instance*
(no class patching; other models of the same class are untouched). HF's ``generate`` calls
that method once per call, after it has merged the call's arguments, the ``generation_config``
argument and ``model.generation_config``, with the values it resolved itself: the generation
config (``use_cache``, ``cache_implementation``, beams, ``num_return_sequences``), the
generation mode, the batch size and ``max_cache_length`` (``max_length - 1``: ``max_length`` is
prompt + ``max_new_tokens``, or ``max_length``, or HF's default of 20 new tokens). We let HF's
own method run first, then swap the ``DynamicCache`` it made for a ``PagedKVCache`` sized from
those numbers. Wrapping ``generate`` instead would mean re-deriving all of that from arguments
that can come from three places.

HF keeps its own default cache (nothing is swapped) when the caller passed
``past_key_values`` or ``cache_implementation`` (also through a generation config), when
``use_cache=False``, and for the decoding modes the paged cache cannot serve: beam search
(all beam modes: HF reorders the cache's batch rows between steps, and the paged pools are
indexed by block, not by row), assisted / prompt-lookup decoding and this model used as an
assistant (HF crops rejected draft tokens from the cache), contrastive search and DoLa.
Greedy search and sampling (``num_return_sequences`` included) get the paged cache.

A second instance attribute wraps ``prepare_inputs_for_generation``, which HF calls right
before every forward: it plans the forward's cache blocks there (``PagedKVCache.plan_hf_step``),
so the compiled forward has no host logic and no graph break.
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import GenerationMode

from . import paged_cache
from .paged_cache import PagedKVCache, _cdiv

logger = logging.getLogger(__name__)

HOOKED = "_prepare_cache_for_generation"  # the GenerationMixin method HF generate calls to make its cache
PLANNER = "prepare_inputs_for_generation"  # ... and the one it calls before every forward
# the arguments we read, by name (their order may change between transformers releases)
REQUIRED_ARGS = ("generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length")
PAGED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
# Blocks of 64 tokens: the paged-attention kernel's tile. HF's mask and the gathered K/V view
# span the whole per-sequence capacity (rounded up to blocks), so small blocks waste less.
BLOCK_SIZE = 64


def hooked_signature(model: torch.nn.Module) -> inspect.Signature:
    """The class's own method signature; a clear error if this transformers release lacks it."""
    method = getattr(type(model), HOOKED, None)
    params = inspect.signature(method).parameters if callable(method) else {}
    missing = [name for name in REQUIRED_ARGS if name not in params]
    if missing:
        import transformers

        raise RuntimeError(
            f"cohere_compile.optimize: transformers {transformers.__version__} has no "
            f"{type(model).__name__}.{HOOKED}({', '.join(REQUIRED_ARGS)}) (missing: {missing}), where the paged KV "
            f"cache becomes generate's default. Use cc.optimize(model) (paged_cache=False, the default) and, "
            f"for the paged cache, pass past_key_values=cc.PagedKVCache(...) to generate or use cc.generate."
        )
    return inspect.signature(method)


class PagedDefaultCache:
    """The instance attribute that replaces HF's ``_prepare_cache_for_generation`` on one model.

    A plain object holding the model (not a closure), so ``copy.deepcopy`` and pickling of the
    model carry it along, pointing at the copy."""

    def __init__(self, model: torch.nn.Module, inner=None):
        self.model, self.inner = model, inner  # inner: an instance attribute we replaced, if any
        self.signature = hooked_signature(model)

    def __call__(self, *args, **kwargs):
        original = self.inner or getattr(type(self.model), HOOKED).__get__(self.model)
        arguments = self.signature.bind(self.model, *args, **kwargs).arguments
        config, model_kwargs = arguments["generation_config"], arguments["model_kwargs"]
        user_cache = model_kwargs.get("past_key_values") is not None
        result = original(*args, **kwargs)
        reason = self.keep_hf_cache_reason(config, arguments["generation_mode"], user_cache)
        if reason is not None:
            logger.info("cohere_compile: generate keeps Hugging Face's cache: %s", reason)
            return result
        made = model_kwargs.get("past_key_values")
        if type(made) is not DynamicCache:  # not HF's plain default (a newer release?): leave its choice alone
            logger.warning("cohere_compile: Hugging Face's generate made a %s, not the DynamicCache this hook replaces; "
                           "the paged KV cache was not used (please report this)", type(made).__name__)
            return result
        model_kwargs["past_key_values"] = self.make_cache(config, arguments["batch_size"], arguments["max_cache_length"])
        return result

    @staticmethod
    def keep_hf_cache_reason(config, mode, user_cache: bool) -> str | None:
        if user_cache:
            return "past_key_values was given"
        if config.use_cache is False:
            return "use_cache=False"
        if config.cache_implementation is not None:
            return f"cache_implementation={config.cache_implementation!r} was asked for"
        if getattr(config, "is_assistant", False):
            return "the model is an assistant (draft) model, whose cache HF crops"
        if mode not in PAGED_MODES:
            return f"{getattr(mode, 'value', mode)} needs cache reordering or cropping, which the paged cache lacks"
        return None

    def make_cache(self, config, batch_size: int, max_cache_length) -> PagedKVCache:
        """Rows: HF's own for a fixed-size cache (its StaticCache), the batch times the expansion
        for return sequences. Per row: HF's ``max_cache_length`` (it covers the prompt: HF
        refuses a ``max_length`` that does not), rounded up to blocks."""
        if not isinstance(max_cache_length, int) or max_cache_length < 1:
            raise ValueError(
                f"cohere_compile: generate resolved max_cache_length={max_cache_length!r}, so the default paged KV "
                f"cache cannot be sized; pass max_new_tokens (or max_length) to generate, or "
                f"past_key_values=cc.PagedKVCache(...), or optimize with paged_cache=False"
            )
        rows = batch_size * max(config.num_beams or 1, config.num_return_sequences or 1)
        blocks = _cdiv(max_cache_length, BLOCK_SIZE)
        hf_model = self.model
        return PagedKVCache(hf_model.config, max_batch_size=rows, max_tokens=rows * blocks * BLOCK_SIZE,
                            block_size=BLOCK_SIZE, dtype=hf_model.dtype, device=hf_model.device,
                            max_seq_len=blocks * BLOCK_SIZE)


class PlanPagedSteps:
    """The instance attribute that wraps HF's ``prepare_inputs_for_generation``: HF calls it
    right before each forward of ``generate``, so a ``PagedKVCache`` can plan that forward's
    blocks here, outside the compiled model, instead of in layer 0 (a graph break per step).
    A forward this did not plan (a caller driving the model itself) is still planned by layer 0."""

    def __init__(self, model: torch.nn.Module, inner=None):
        self.model, self.inner = model, inner  # inner: an instance attribute we replaced, if any

    def __call__(self, *args, **kwargs):
        original = self.inner or type(self.model).prepare_inputs_for_generation.__get__(self.model)
        inputs = original(*args, **kwargs)
        cache = inputs.get("past_key_values")
        if isinstance(cache, paged_cache.PagedKVCache) and not cache.host_managed:
            x = inputs.get("input_ids")
            x = inputs.get("inputs_embeds") if x is None else x
            cache.plan_hf_step(x.shape[0], x.shape[1])
        return inputs


WRAPPERS = {HOOKED: PagedDefaultCache, PLANNER: PlanPagedSteps}


def install(hf_model: torch.nn.Module) -> None:
    """Make the paged cache ``hf_model.generate``'s default (idempotent). An instance attribute
    already there (not ours) is wrapped, and put back by ``uninstall``."""
    for name, wrapper in WRAPPERS.items():
        current = hf_model.__dict__.get(name)
        inner = current.inner if isinstance(current, wrapper) else current
        hf_model.__dict__[name] = wrapper(hf_model, inner)


def uninstall(hf_model: torch.nn.Module) -> None:
    """Back to HF's default cache (a no-op if ``install`` was never called)."""
    for name, wrapper in WRAPPERS.items():
        current = hf_model.__dict__.get(name)
        if isinstance(current, wrapper):
            if current.inner is None:
                del hf_model.__dict__[name]
            else:
                hf_model.__dict__[name] = current.inner


def is_installed(hf_model: torch.nn.Module) -> bool:
    return isinstance(hf_model.__dict__.get(HOOKED), PagedDefaultCache)
