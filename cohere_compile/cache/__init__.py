"""The paged KV cache: a block pool, block tables, and its Hugging Face ``Cache`` face."""

from .paged_cache import CacheCapacityError, PagedKVCache, SequenceTooLongError

__all__ = ["CacheCapacityError", "PagedKVCache", "SequenceTooLongError"]
