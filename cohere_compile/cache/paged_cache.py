"""``PagedKVCache``: a pool of fixed-size KV blocks, a block table per sequence, and a
Hugging Face ``Cache`` face so ``model.generate(..., past_key_values=cache)`` works.

Each cache row (``0 .. max_batch_size-1``) holds one sequence. A sequence owns the pool
blocks listed in its block-table row and grows one block (``block_size`` tokens) at a
time without copies; ``free(row)`` returns its blocks to the pool for the next one.

Block allocation is host-side Python and runs *before* a forward (``prepare``), so
the forward itself has fixed shapes and no host logic: it writes the step's K/V with
``cohere::paged_kv_write`` and hands attention a dense ``cohere::paged_gather`` view,
which the ``paged_attention`` pass turns into ``cohere::paged_attention`` on decode.
Capacity errors are raised by ``prepare`` before any state changes.

Two ways to drive it:
- ``cohere_compile.generate`` (host-managed): it calls ``prepare`` for exactly the rows
  in the batch before every forward; the decode step is a fixed-shape graph over all
  rows, idle rows skipped, so it can be captured as a CUDA graph.
- plain HF ``generate``: batch row ``i`` is cache row ``i``. On a model from ``cc.optimize``,
  ``plan_hf_step`` plans each forward before it runs (no graph break); otherwise the first
  layer's ``update`` calls ``prepare`` itself (a graph break under ``torch.compile``). The
  fast path is ``cohere_compile.generate``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class CacheCapacityError(RuntimeError):
    """The block pool has no room for the tokens a forward would add."""


class SequenceTooLongError(ValueError):
    """A sequence would grow past the cache's per-sequence limit (``max_seq_len``), or past the
    model's ``max_seq_length`` / ``max_position_embeddings`` (``seq_limit.py``)."""


def pinned(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``src`` in page-locked memory when it goes to a GPU, so a ``non_blocking`` copy does not
    sync the stream: the host can queue the next decode step while the GPU runs this one."""
    return src.pin_memory() if device.type == "cuda" else src


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _PagedLayer(CacheLayerMixin):
    """One decoder layer's K and V pools, ``(num_blocks, kv_heads, block_size, head_dim)``."""

    is_compileable = False  # HF's own generate must not wrap us in its fullgraph compile
    is_sliding = False

    def __init__(self, cache: "PagedKVCache", layer_idx: int, shape, dtype, device):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype, self.device = dtype, device
        self.batch_size = cache.rows
        self.is_initialized = True
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
        # static shapes too: in the dynamic prefill graph a pool dimension left symbolic was duck-sized
        # equal to the prompt length when they happened to match (4 blocks, 4 tokens), which then
        # recompiled for the next prompt; the pool's shape changes only with a new cache anyway
        torch._dynamo.mark_static(self.keys)
        torch._dynamo.mark_static(self.values)

    def lazy_initialization(self, key_states, value_states) -> None:  # pools exist from the start
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cache = self.cache
        if key_states.dtype != self.dtype or key_states.shape[1] != self.keys.shape[1] \
                or key_states.shape[3] != self.keys.shape[3]:
            raise ValueError(
                f"PagedKVCache: layer {self.layer_idx} got keys {tuple(key_states.shape)} {key_states.dtype}, but the "
                f"cache holds {self.keys.shape[1]} KV heads x {self.keys.shape[3]} dims in {self.dtype}; build it "
                f"with the model's config and dtype: PagedKVCache(model.config, ..., dtype=model.dtype)"
            )
        if not cache.host_managed and self.layer_idx == 0:
            if cache.planned:  # planned before this forward (plan_hf_step): no host work inside it
                cache.planned = False
            else:
                cache._prepare_hf_forward(key_states.shape[0], key_states.shape[2])
        torch.ops.cohere.paged_kv_write(self.keys, self.values, key_states, value_states, cache.step_slots)
        view = cache.step_view_len
        return (
            torch.ops.cohere.paged_gather(self.keys, cache.step_table, cache.step_lens, view),
            torch.ops.cohere.paged_gather(self.values, cache.step_table, cache.step_lens, view),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.step_view_len if self.cache.host_managed else self.cache.max_seq_len, 0

    def get_seq_length(self) -> int:
        return self.cache.seq_lens[0]

    def get_max_length(self) -> int:
        return self.cache.max_seq_len

    def reset(self) -> None:
        self.cache.reset()


class PagedKVCache(Cache):
    """A paged KV cache for Cohere models.

    Args:
        config: the model's ``CohereConfig`` (layers, KV heads, head dim).
        max_batch_size: rows (sequences decoded together).
        max_tokens: the pool's total token capacity over all rows (rounded up to blocks).
        block_size: tokens per block (a sequence grows this many tokens at a time).
        dtype, device: of the pools; default the config's dtype and CUDA when available.
        max_seq_len: longest sequence one row may hold (prompt + generated); default
            ``min(max_tokens, config.max_position_embeddings)``.
    """

    def __init__(self, config, max_batch_size: int, max_tokens: int, block_size: int = 256,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 max_seq_len: int | None = None):
        if getattr(config, "model_type", None) != "cohere":
            raise ValueError(f"PagedKVCache: config.model_type={getattr(config, 'model_type', None)!r}; "
                             f"only Cohere configs ('cohere') are supported")
        if max_batch_size < 1 or max_tokens < 1 or block_size < 1:
            raise ValueError("PagedKVCache: max_batch_size, max_tokens and block_size must be positive")
        if block_size > 64 and block_size % 64:
            raise ValueError(f"PagedKVCache: block_size {block_size} must be a multiple of 64 (or at most 64), "
                             f"the attention kernel's tile")
        self.rows = max_batch_size  # cache rows: one sequence each
        self.block_size = block_size
        self.num_blocks = _cdiv(max_tokens, block_size)
        if max_seq_len is None:
            max_seq_len = min(max_tokens, getattr(config, "max_position_embeddings", max_tokens))
        self.max_blocks_per_seq = _cdiv(max_seq_len, block_size)
        self.max_seq_len = self.max_blocks_per_seq * block_size
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (self.num_blocks, config.num_key_value_heads, block_size, head_dim)
        layers = [_PagedLayer(self, i, shape, dtype, device) for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.dtype, self.device = dtype, device
        self.block_table = torch.full((max_batch_size, self.max_blocks_per_seq), -1, dtype=torch.int32, device=device)
        torch._dynamo.mark_static_address(self.block_table)
        # Fixed buffers for the all-rows decode step (static addresses: CUDA-graph safe).
        self._decode_slots = torch.full((max_batch_size, 1), -1, dtype=torch.int64, device=device)
        self._decode_lens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        torch._dynamo.mark_static_address(self._decode_slots)
        torch._dynamo.mark_static_address(self._decode_lens)
        self.host_managed = False
        self.reset()

    # ---- host-side bookkeeping -------------------------------------------------------
    def reset(self) -> None:
        """Free every row and block."""
        self.seq_lens = [0] * self.rows
        self.row_blocks: list[list[int]] = [[] for _ in range(self.rows)]
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))  # a stack: pop() takes block 0 first
        self.block_table.fill_(-1)
        self.step_slots = self._decode_slots
        self.step_lens = self._decode_lens
        self.step_table = self.block_table
        self.step_view_len = self.max_seq_len
        self.planned, self.planned_offset = False, 0

    def free(self, row: int) -> None:
        """End the sequence in ``row``: its blocks go back to the pool."""
        self.free_blocks.extend(reversed(self.row_blocks[row]))
        self.row_blocks[row] = []
        self.seq_lens[row] = 0
        self.block_table[row].fill_(-1)

    @property
    def free_tokens(self) -> int:
        return len(self.free_blocks) * self.block_size

    def blocks_needed(self, row: int, n_tokens: int) -> int:
        return max(0, _cdiv(self.seq_lens[row] + n_tokens, self.block_size) - len(self.row_blocks[row]))

    def check_room(self, rows: Sequence[int], n_tokens: int) -> None:
        """Raise before anything changes if ``n_tokens`` more tokens do not fit every row."""
        for row in rows:
            if not 0 <= row < self.rows:
                raise IndexError(f"PagedKVCache: row {row} out of range 0..{self.rows - 1}")
            if self.seq_lens[row] + n_tokens > self.max_seq_len:
                raise SequenceTooLongError(
                    f"PagedKVCache: row {row} would hold {self.seq_lens[row] + n_tokens} tokens, past max_seq_len "
                    f"{self.max_seq_len}; shorten the prompt or max_new_tokens, or build the cache with a larger "
                    f"max_seq_len / max_tokens"
                )
        need = sum(self.blocks_needed(r, n_tokens) for r in rows)
        if need > len(self.free_blocks):
            raise CacheCapacityError(
                f"PagedKVCache: {need} more blocks of {self.block_size} tokens needed, {len(self.free_blocks)} free "
                f"of {self.num_blocks}; build the cache with a larger max_tokens or free finished rows"
            )

    def _grow(self, row: int, n_tokens: int) -> None:
        for _ in range(self.blocks_needed(row, n_tokens)):
            block = self.free_blocks.pop()
            self.block_table[row, len(self.row_blocks[row])] = block
            self.row_blocks[row].append(block)

    def prepare(self, rows: Sequence[int], n_tokens: int, *, decode_all_rows: bool = False) -> None:
        """Set up the next forward: its batch row ``i`` is cache row ``rows[i]`` and adds
        ``n_tokens`` tokens. With ``decode_all_rows`` the batch is every cache row (one token
        each; rows not in ``rows`` idle), in the fixed buffers a CUDA graph can replay."""
        rows = list(rows)
        self.check_room(rows, n_tokens)
        for row in rows:
            self._grow(row, n_tokens)
        if decode_all_rows:
            if n_tokens != 1:
                raise ValueError("PagedKVCache.prepare: decode_all_rows takes one token per row")
            slots = [-1] * self.rows
            lens = [0] * self.rows
            for row in rows:
                pos = self.seq_lens[row]
                slots[row] = self._slot(row, pos)
                lens[row] = pos + 1
            self._decode_slots.copy_(pinned(torch.tensor(slots, dtype=torch.int64).view(-1, 1), self.device),
                                     non_blocking=True)
            self._decode_lens.copy_(pinned(torch.tensor(lens, dtype=torch.int32), self.device), non_blocking=True)
            self.step_slots, self.step_lens, self.step_table = self._decode_slots, self._decode_lens, self.block_table
            self.step_view_len = self.max_seq_len
        else:
            slots = []
            for row in rows:
                pos = range(self.seq_lens[row], self.seq_lens[row] + n_tokens)
                slots.append([self._slot(row, p) for p in pos])
            lens = [self.seq_lens[r] + n_tokens for r in rows]
            self.step_slots = torch.tensor(slots, dtype=torch.int64, device=self.device)
            self.step_lens = torch.tensor(lens, dtype=torch.int32, device=self.device)
            self.step_table = self.block_table[rows]
            # the full view: one compiled prefill graph serves every prompt length
            self.step_view_len = self.max_seq_len
        for row in rows:
            self.seq_lens[row] += n_tokens

    def _slot(self, row: int, pos: int) -> int:
        """Flat pool slot (block * block_size + offset) of position ``pos`` of ``row``."""
        return self.row_blocks[row][pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.compiler.disable
    def _prepare_hf_forward(self, batch: int, n_tokens: int) -> None:
        """HF ``generate`` drives the cache: batch row i is cache row i."""
        if batch > self.rows:
            raise ValueError(f"PagedKVCache: batch {batch} exceeds max_batch_size {self.rows}")
        self.prepare(range(batch), n_tokens)
        self.step_view_len = self.max_seq_len  # HF sized its mask with get_mask_sizes

    def plan_hf_step(self, batch: int, n_tokens: int) -> None:
        """Plan HF ``generate``'s next forward before it runs (``cc.optimize`` hooks HF's
        ``prepare_inputs_for_generation`` to call this), so the compiled forward holds no host
        logic and no graph break; layer 0's ``update`` then only takes the plan."""
        if self.planned:
            raise RuntimeError("PagedKVCache.plan_hf_step: the previously planned forward never ran; "
                               "call the model's forward once per plan_hf_step")
        offset = self.seq_lens[0]
        self._prepare_hf_forward(batch, n_tokens)
        self.planned, self.planned_offset = True, offset

    @property
    def max_batch_size(self) -> int:
        return self.rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # HF's mask asks this (as the query offset) inside the forward: a planned forward's own
        # tokens are already in seq_lens, so answer with the length before them
        return self.planned_offset if self.planned else self.seq_lens[0]

    def __repr__(self) -> str:
        return (f"PagedKVCache(rows={self.rows}, blocks={self.num_blocks}x{self.block_size}, "
                f"free={len(self.free_blocks)}, max_seq_len={self.max_seq_len}, dtype={self.dtype}, "
                f"device={self.device})")
