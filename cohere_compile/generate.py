"""``generate``: continuous-batching decode over a ``PagedKVCache``.

Prompts of different lengths are decoded together: each takes a cache row, is
prefilled on its own, then joins the batch; a finished sequence frees its row and
blocks, and the next waiting prompt joins. The decode step always runs over every
cache row (idle rows write nothing), so it has one fixed shape: compiled once with
our passes (``paged_attention`` reads the cache through the block table) and, on
CUDA, replayed as a CUDA graph.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import deque
from typing import Callable, Iterable, Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .api import base_model, check_model, options_of
from .backend import make_backend
from .cache import PagedKVCache
from .cache.paged_cache import pinned
from .colocate import ensure_colocated
from .kernels import pdl
from .passes.manager import validate_pass_names
from .seq_limit import SequenceTooLongError, max_sequence_length, too_long_message

TokenCallback = Callable[[int, int], None]  # (prompt index, new token id)


def _as_token_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
        raise TypeError("generate: prompts must be a list of token-id lists or 1-D tensors (one per prompt)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.is_floating_point():
                raise TypeError(f"generate: prompt {i} must be a 1-D integer tensor, got {p.dim()}-D {p.dtype}")
            p = p.tolist()
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        out.append(p)
    return out


def _stop_set(model, stop_tokens) -> frozenset[int]:
    if stop_tokens is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop_tokens = [] if eos is None else [eos] if isinstance(eos, int) else eos
    return frozenset(int(t) for t in stop_tokens)


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


class _Sampler:
    """Picks the next token of every row on the device (no host round trip)."""

    def __init__(self, temperature, top_k, top_p, seed, device):
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
        self.greedy = temperature == 0
        self.warpers = None if self.greedy else _warpers(temperature, top_k, top_p)
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.greedy:
            return logits.argmax(-1)
        probs = torch.softmax(self.warpers(None, logits.float()), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D mask HF passes through untouched to every attention implementation: additive
    (0 = attend, dtype min = masked), since eager attention adds the mask to its scores."""
    return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)


# Decode-step Inductor defaults on CUDA (the decode graph only; prefill keeps Inductor's own):
# - coordinate-descent tuning of the step's Triton kernels: 5.45 vs 5.92 ms per Aya-8B B1 step
#   on the H200 (bench/results/decode_*_probe.json);
# - Programmatic Dependent Launch ("triton.enable_pdl", Hopper): each Inductor kernel starts while
#   the one before it drains, which at B1 hides most of the gaps between the step's ~300 short
#   kernels. H200, 2026-12-03, five interleaved rounds in one process
#   (decode_aya-8b_L32_b1_rounds.json): 216.3 vs 193.5 tok/s decode steps (4.62 vs 5.17 ms).
#   Our own custom-op kernels follow (kernels/pdl.py; ``custom_op_pdl=False`` keeps them out).
#   H200, 2026-12-04, same process: B1 bf16 decode steps 214.3 tok/s vs 210.6 with Inductor's
#   kernels alone and 207.7 without PDL (median of 3 rounds, decode_aya-8b_L32_b1_custom_pdl.json);
#   int4 Triton GEMV decode 314.0 vs 280.4 tok/s (quant_aya-8b_L32_decode_custom_pdl.json).
#   ``inductor_options={"triton.enable_pdl": False}`` opts out of both.
CUDA_DECODE_INDUCTOR = {"coordinate_descent_tuning": True, "triton.enable_pdl": True}

# Passes generate adds on CUDA to those cc.optimize chose, unless the caller picks its own:
# qk_norm_rope, so that each layer's RoPE (and QK norm) and its k/v cache write become one kernel
# (passes/rope_kv_write.py). H200, 2026-12-02, Aya-8B shapes, 32 layers, in one process each
# (bench/results/decode_aya-8b_L32_{b1,ragged}_rope.json): decode steps at B1 203.0 -> 212.7
# tok/s, ragged 32 4576 -> 4660 tok/s; whole calls 197.5 -> 207.3 and 2544 -> 2668.
CUDA_GENERATE_PASSES = ("qk_norm_rope",)


def _bucketed_blocks(blocks: int) -> int:
    """Blocks per sequence of the default cache: a power of two, at least 2. The pool's shape is
    part of both compiled graphs (decode is compiled for fixed shapes, and a dimension of size 1
    is specialised even in the dynamic prefill graph), so sizing it to each request recompiled
    at nearly every new request length (on the H200 a 32-layer recompile takes ~2 minutes);
    buckets bound that to one compile per doubling, for at most twice the pool memory (pass a
    ``cache`` to size it yourself)."""
    return max(2, 1 << (max(1, blocks) - 1).bit_length())


def warn_if_unverified_on_cuda(config, on_cuda: bool) -> None:
    """Say so where the compiled CUDA path is not known to be right: QK norm with GQA (Command R+)
    failed two GPU parity tests in two runs on 2026-12-02 and passed every re-run since; until the
    cause is found it stays unverified (README, "Open" under Decoding)."""
    gqa = config.num_key_value_heads < config.num_attention_heads
    if on_cuda and getattr(config, "use_qk_norm", False) and gqa:
        warnings.warn(
            "cc.generate: compiled decoding on CUDA for models with QK norm and grouped KV heads (e.g. Command R+) "
            "gave tokens unlike Hugging Face's in two GPU test runs (intermittent, not yet diagnosed); check the output "
            "against compiled=False before relying on it (see the README's open problem under Decoding).",
            stacklevel=3,
        )


def _generate_passes(model, passes: Sequence[str] | None, on_cuda: bool) -> tuple[str, ...]:
    """The passes of generate's own graphs: ``passes`` if given, else cc.optimize's (plus
    CUDA_GENERATE_PASSES on CUDA); paged_attention always."""
    if passes is not None:
        chosen = tuple(validate_pass_names(passes))
    else:
        chosen = (*options_of(model).passes, *(CUDA_GENERATE_PASSES if on_cuda else ()))
    return tuple(dict.fromkeys((*chosen, "paged_attention")))


def _launching_with_pdl(decode):
    """``decode`` with our custom-op kernels launched with Programmatic Dependent Launch
    (kernels/pdl.py) inside it: the CUDA graph records that launch attribute when it captures."""
    @functools.wraps(decode)
    def call(*args, **kwargs):
        with pdl.launches(True):
            return decode(*args, **kwargs)
    return call


def _compiled_forwards(model, cache: PagedKVCache, compiled: bool, cuda_graphs: bool | None,
                       inductor_options: dict | None = None, merge_projections: bool = False,
                       passes: Sequence[str] | None = None, custom_op_pdl: bool | None = None):
    """(prefill, decode): the model's forward compiled with our passes (paged_attention
    included). Decode is one fixed-shape graph, a CUDA graph on CUDA unless
    ``cuda_graphs=False``, whose custom-op kernels launch with PDL when ``custom_op_pdl``
    (None: when Inductor's do, ``triton.enable_pdl``); prefill is one graph for every prompt
    length (dynamic). Kept on the model, so later calls reuse them."""
    hf_model = base_model(model)
    if not compiled:
        return hf_model.forward, hf_model.forward
    if options_of(model).regional:
        # regional compile hides the decoder stack from Dynamo (compiled layer by layer),
        # so the whole-step graph that CUDA graphs and paged_attention need cannot be built
        raise ValueError(
            "cc.generate: this model was optimized with regional=True (a training mode); decoding needs the "
            "whole-model step. Use cc.optimize(model) without regional=True for inference, or pass compiled=False."
        )
    on_cuda = cache.device.type == "cuda"
    warn_if_unverified_on_cuda(hf_model.config, on_cuda)
    passes = _generate_passes(model, passes, on_cuda)
    cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
    user = {**options_of(model).inductor, **(inductor_options or {})}
    decode_options = {**(CUDA_DECODE_INDUCTOR if on_cuda else {}), **user}
    if custom_op_pdl is None:
        custom_op_pdl = bool(decode_options.get("triton.enable_pdl", False))
    custom_op_pdl = on_cuda and custom_op_pdl
    key = (passes, bool(cuda_graphs), tuple(sorted(decode_options.items())), tuple(sorted(user.items())),
           merge_projections, custom_op_pdl)
    cached = hf_model.__dict__.setdefault("_cohere_generate_fns", {})
    if key not in cached:
        common = {"passes": list(passes), "merge_projections": merge_projections}
        decode = {**common, **decode_options}
        if cuda_graphs:
            decode["triton.cudagraphs"] = True
        decode_fn = torch.compile(hf_model.forward, backend=make_backend(decode), fullgraph=True, dynamic=False)
        cached[key] = (
            torch.compile(hf_model.forward, backend=make_backend({**common, **user}), dynamic=True),
            _launching_with_pdl(decode_fn) if custom_op_pdl else decode_fn,
        )
    return cached[key]


def _merge_projections(model, requested: bool | None, compiled: bool, device: torch.device) -> bool:
    """Whether this call computes q/k/v and gate/up as one matmul each (co-locating the weights
    first: the merged graphs read each group as one block, so the layout is checked every call)."""
    if not compiled or requested is False or (requested is None and device.type != "cuda"):
        return False
    if ensure_colocated(base_model(model)):
        return True
    if requested:
        raise ValueError("generate: merge_projections=True needs plain, bias-free q/k/v/gate/up weights of one "
                         "dtype, or our int4 linears (int4_kernel='triton'); this model has neither (torchao-"
                         "quantized?). Call without merge_projections.")
    return False  # the default on a model that cannot be merged (e.g. torchao int4): separate matmuls


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] | None = None,
    callback: TokenCallback | None = None,
    max_batch_size: int | None = None,
    cache: PagedKVCache | None = None,
    block_size: int = 256,
    compiled: bool = True,
    cuda_graphs: bool | None = None,
    seed: int | None = None,
    stats: dict | None = None,
    inductor_options: dict | None = None,
    merge_projections: bool | None = None,
    passes: Sequence[str] | None = None,
    custom_op_pdl: bool | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens for every prompt; returns one list of new
    token ids per prompt (prompt excluded, stop token included when one ends it).

    ``temperature=0`` is greedy; otherwise sampling with optional ``top_k`` / ``top_p``
    (``seed`` makes it repeatable). ``stop_tokens`` defaults to the model's EOS ids
    (pass ``()`` to run every sequence to ``max_new_tokens``). ``callback(i, token)``
    streams each new token of prompt ``i``. Up to ``max_batch_size`` sequences (default:
    all prompts, at most 32) decode together; the rest wait for a free row. ``cache``
    may be given (e.g. to size the pool); it is reset first. The default one holds a power-of-two
    number of blocks per sequence (at least 2) that fits the longest request, so requests of
    similar length reuse the compiled graphs. ``stats``, a dict, receives
    timings: prefill_s, decode_s (wall, synchronised), decode_steps, prefills.
    ``compiled=False`` runs the model's eager forward (a reference path). ``inductor_options``
    are Inductor config patches for the compiled prefill and decode (on top of those given
    to ``cc.optimize``); they may also carry the backend's ``int4_split_k`` (default True:
    passes/int4_split_k.py; ``False`` keeps one-row int4 GEMVs' own split-K sums and SwiGLU).
    ``merge_projections`` puts each layer's q/k/v and gate/up weights back to back in memory
    (``colocate.py``; same parameters and values) and computes each group as one matmul
    (``passes/merge_projections.py``); the layout is checked, and restored if something moved the
    weights, before every call. Default (``None``): on for a compiled CUDA model with plain
    weights (H200, Aya-8B: decode steps 8-9% faster at batch 1 and 32), off otherwise (CPU is not
    measured; quantized weights cannot be merged). ``True`` on a model that cannot be merged raises.
    ``passes`` chooses the passes of generate's own graphs (default: those ``cc.optimize`` chose,
    plus ``qk_norm_rope`` on CUDA, so RoPE and the cache write are one kernel per layer: measured
    4.8% faster decode steps at batch 1 on the H200); ``paged_attention`` is always added.
    ``custom_op_pdl``: whether our own kernels in the CUDA decode step (norm, RoPE + cache write,
    paged attention, SwiGLU, int4 GEMV) launch with Programmatic Dependent Launch, as Inductor's do
    there by default; None (default) follows the decode graph's ``triton.enable_pdl``. Needs a GPU
    of compute capability >= 9.0 (elsewhere the kernels launch as usual).
    """
    check_model(model)
    prompts = _as_token_lists(prompts)
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    config = base_model(model).config
    first_param = next(model.parameters())
    device, dtype = first_param.device, first_param.dtype
    longest = max(len(p) for p in prompts) + max_new_tokens
    if cache is None:
        rows = min(len(prompts), max_batch_size or 32)
        blocks_per_seq = _bucketed_blocks(-(-longest // block_size))
        cache = PagedKVCache(config, rows, rows * blocks_per_seq * block_size, block_size=block_size,
                             dtype=dtype, device=device,
                             max_seq_len=blocks_per_seq * block_size)
    limit, source = max_sequence_length(base_model(model))
    for i, p in enumerate(prompts):
        need = len(p) + max_new_tokens
        if limit is not None and need > limit:
            raise SequenceTooLongError("generate: " + too_long_message(
                f"prompt {i} ({len(p)} tokens) + max_new_tokens {max_new_tokens}", need, limit, source))
        if need > cache.max_seq_len or -(-need // cache.block_size) > cache.num_blocks:
            raise ValueError(f"generate: prompt {i} needs {need} cache positions, more than the cache holds for one "
                             f"sequence (max_seq_len {cache.max_seq_len}, {cache.num_blocks} blocks of "
                             f"{cache.block_size}); build a larger PagedKVCache or shorten the request")
    cache.reset()
    cache.host_managed = True
    sampler = _Sampler(temperature, top_k, top_p, seed, device)
    stop = _stop_set(model, stop_tokens)
    merge_projections = _merge_projections(model, merge_projections, compiled, device)
    prefill_forward, decode = _compiled_forwards(model, cache, compiled, cuda_graphs, inductor_options,
                                                 merge_projections, passes, custom_op_pdl)
    bs = cache.block_size

    results: list[list[int]] = [[] for _ in prompts]
    waiting = deque(range(len(prompts)))
    row_of: dict[int, int] = {}  # running prompt index -> cache row
    reserved = {}  # cache row -> most blocks its sequence may still take (admission control)
    free_rows = list(range(cache.rows - 1, -1, -1))
    last_ids = torch.zeros(cache.rows, 1, dtype=torch.long, device=device)  # each row's newest token
    positions = torch.arange(cache.max_seq_len, device=device)
    timing = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "prefills": 0}

    def emit(i: int, token: int) -> bool:
        """Record a token; True when prompt i is finished."""
        results[i].append(token)
        if callback is not None:
            callback(i, token)
        return token in stop or len(results[i]) >= max_new_tokens

    def finish(i: int) -> None:
        row = row_of.pop(i)
        cache.free(row)
        reserved.pop(row)
        free_rows.append(row)

    def admit() -> None:
        while waiting and free_rows:
            i = waiting[0]
            need = -(-(len(prompts[i]) + max_new_tokens) // bs)
            if sum(reserved.values()) + need > cache.num_blocks:
                return  # wait for a running sequence to free its blocks
            waiting.popleft()
            row = free_rows.pop()
            row_of[i], reserved[row] = row, need
            prefill(i, row)

    def prefill(i: int, row: int) -> None:
        t0 = time.perf_counter()
        tokens = prompts[i]
        n = len(tokens)
        cache.prepare([row], n)
        q = torch.arange(n, device=device)
        mask = _additive((torch.arange(cache.step_view_len, device=device)[None, :] <= q[:, None])[None, None], dtype)
        out = prefill_forward(input_ids=torch.tensor([tokens], device=device), position_ids=q[None],
                    attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = sampler(out.logits[:, -1])
        last_ids[row] = token
        token = int(token.item())
        timing["prefill_s"] += time.perf_counter() - t0
        timing["prefills"] += 1
        if emit(i, token):
            finish(i)

    def launch_step(active: dict[int, int]) -> tuple:
        """Queue one decode step for the ``active`` rows (the others idle); returns what
        reading its tokens needs."""
        pos = [0] * cache.rows
        for row in active.values():
            pos[row] = cache.seq_lens[row]
        cache.prepare(sorted(active.values()), 1, decode_all_rows=True)
        visible = (positions[None, :] < cache.step_lens[:, None].long())[:, None, None, :]
        out = decode(input_ids=last_ids, position_ids=pinned(torch.tensor(pos), device).to(device, non_blocking=True)[:, None],
                     attention_mask=_additive(visible, dtype), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)
        tokens = sampler(out.logits[:, -1])
        last_ids.copy_(tokens[:, None])
        host = tokens.to("cpu", non_blocking=True)
        done = torch.cuda.Event() if device.type == "cuda" else None
        if done is not None:
            done.record()
        return active, host, done

    def read_step(active, host, done) -> None:
        if done is not None:
            done.synchronize()
        tokens = host.tolist()
        timing["decode_steps"] += 1
        for i, row in active.items():
            if i in row_of and emit(i, tokens[row]):
                finish(i)

    # Steps are pipelined: step t+1 is queued before step t's tokens are read on the
    # host, so the GPU does not wait for Python. A row that is still short of
    # max_new_tokens runs in step t+1 even if step t's token turns out to stop it:
    # that token is dropped (read_step skips finished rows), and waiting prompts are
    # admitted once that step has landed.
    try:
        admit()
        loop_start, prefill_before = time.perf_counter(), timing["prefill_s"]
        pending = None
        while row_of or pending is not None:
            in_flight = pending[0] if pending is not None else {}
            active = {i: row for i, row in row_of.items() if len(results[i]) + (i in in_flight) < max_new_tokens}
            current = launch_step(active) if active else None
            if pending is not None:
                read_step(*pending)
            pending = current
            if pending is None or (waiting and free_rows) or any(i not in row_of for i in pending[0]):
                if pending is not None:
                    read_step(*pending)
                    pending = None
                admit()
        timing["decode_s"] = time.perf_counter() - loop_start - (timing["prefill_s"] - prefill_before)
    finally:
        cache.host_managed = False
    if stats is not None:
        stats.update(timing)
    return results
