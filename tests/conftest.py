"""Shared fixtures for the CPU test suite.

``TRITON_INTERPRET=1`` must be set before triton / cohere_compile are imported, so the
``cohere::`` ops run their Triton kernels through Triton's CPU interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hypothesis import settings  # noqa: E402

import cohere_compile  # noqa: E402, F401  (registers the cohere:: ops)

# No example database: it would write .hypothesis/ into the repository root.
settings.register_profile("cohere", database=None, deadline=None)
settings.load_profile("cohere")


@pytest.fixture
def ops_torch_path(monkeypatch):
    """The test's ``cohere::`` ops take their plain-torch path (what CPU users run) instead of
    running their Triton kernels through the interpreter, which runs each kernel launch in
    Python (one int4 test's eager generate of 6 tokens took 18.7 s interpreted, 0.08 s without).
    Only for end-to-end tests whose subject is a pass, generate, the cache or training plumbing:
    every kernel is checked against its reference through the interpreter in its own tests
    (test_kernels.py, test_paged.py, test_int4_triton.py, ...), end to end in the passes' and
    backward tests (test_passes.py, test_backward.py, and test_paged.py's compiled-decode and
    fused RoPE + cache-write tests) and on the GPU (``pytest -m gpu``)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def tiny_config(use_qk_norm: bool, num_kv_heads: int, attn_implementation: str = "sdpa", layers: int = 2):
    return transformers.CohereConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        use_qk_norm=use_qk_norm,
        attn_implementation=attn_implementation,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def make_model(cfg, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised CohereForCausalLM in eval mode whose LayerNorm weights are
    not all ones (so a dropped or misplaced norm weight shows up in the logits)."""
    torch.manual_seed(seed)
    model = transformers.CohereForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                torch.nn.init.normal_(p, 1.0, 0.1)
    return model.to(dtype).eval()


def with_weights_of(ref, qmodel, dequantize):
    """``ref`` (a plain HF model of ``qmodel``'s config) holding ``qmodel``'s weights, the 4-bit
    ones through ``dequantize``; its LM head untied as the quantized model's is."""
    from cohere_compile.quant import is_quantized

    ref.config.tie_word_embeddings = qmodel.config.tie_word_embeddings
    ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())
    qparams = dict(qmodel.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(dequantize(qparams[name]) if is_quantized(qparams[name]) else qparams[name])
    return ref


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def assert_rope_kv_write_matches_reference(q, k, v, q_weight, k_weight, cos, sin, k_pool, v_pool, slots, tol,
                                           fused=None):
    """``cohere::qk_norm_rope_kv_write`` (or ``fused``, a function of the same arguments) on copies
    of the pools = ``qk_norm_rope``'s reference, then ``paged_write`` of the rotated k and of v.
    Returns the op's (k_pool, v_pool)."""
    from cohere_compile.ops import reference

    fused = fused or torch.ops.cohere.qk_norm_rope_kv_write
    ours, ref = (k_pool.clone(), v_pool.clone()), (k_pool.clone(), v_pool.clone())
    q_out = fused(q, k, v, q_weight, k_weight, cos, sin, 1e-5, *ours, slots)
    q_rot, k_rot = reference.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, 1e-5)
    reference.paged_write(*ref, k_rot, v, slots)
    assert rel_err(q_out, q_rot) < tol and rel_err(ours[0], ref[0]) < tol and torch.equal(ours[1], ref[1])
    return ours


def padded_inputs(batch: int = 2, seq: int = 9, pad: int = 3, seed: int = 1):
    """Left-padded batch: row 1 has its first ``pad`` tokens masked out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and pad:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, mask


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
