"""FX graph rewrites, one module per Cohere subgraph family, and the pass manager."""

from .manager import DEFAULT_PASSES, PASS_NAMES, CoherePassManager, recording

__all__ = ["CoherePassManager", "DEFAULT_PASSES", "PASS_NAMES", "recording"]
