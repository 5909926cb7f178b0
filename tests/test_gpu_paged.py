"""GPU: the paged-cache ops against float64 references at Aya-like sizes, and
cc.generate (compiled decode step, CUDA graph) against HF greedy decoding on CUDA."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_paged_ops_match_reference_on_cuda(dtype):
    import cohere_compile  # noqa: F401
    from cohere_compile.ops import reference as R
    from conftest import assert_rope_kv_write_matches_reference

    dev, bs, hkv, h, d = "cuda", 256, 8, 32, 128
    lens = torch.tensor([1, 255, 256, 1999, 700, 0], dtype=torch.int32, device=dev)
    max_blocks = 8
    n_blocks = 48
    k_pool = torch.randn(n_blocks, hkv, bs, d, device=dev, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    table = torch.randperm(n_blocks, device=dev)[: 6 * max_blocks].view(6, max_blocks).int()
    q = torch.randn(6, h, 1, d, device=dev, dtype=dtype)
    keep = torch.rand(6, 1, 1, max_blocks * bs, device=dev) > 0.1
    for mask in (None, keep, torch.where(keep, 0.0, float("-inf")).to(dtype)):
        out = torch.ops.cohere.paged_attention(q, k_pool, v_pool, table, lens, mask, d ** -0.5)
        ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
        ref = R.paged_attention(q.double(), k_pool.double(), v_pool.double(), table, lens, ref_mask, d ** -0.5)
        assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    k = torch.randn(6, hkv, 3, d, device=dev, dtype=dtype)
    slots = torch.randint(0, n_blocks * bs, (6, 3), device=dev)
    slots[2, 1] = -1
    ours, ref = (k_pool.clone(), v_pool.clone()), (k_pool.clone(), v_pool.clone())
    torch.ops.cohere.paged_kv_write(*ours, k, k, slots)
    R.paged_write(*ref, k, k, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    # the same write fused with the step's QK-norm + RoPE
    qh = torch.randn(6, h, 3, d, device=dev, dtype=dtype)
    cos, sin = torch.randn(2, 1, 3, d, device=dev, dtype=dtype)
    qw, kw = torch.randn(h, d, device=dev, dtype=dtype), torch.randn(hkv, d, device=dev, dtype=dtype)
    assert_rope_kv_write_matches_reference(qh, k, k, qw, kw, cos, sin, k_pool, v_pool, slots,
                                           tol=1e-5 if dtype == torch.float32 else 2e-2)


def test_paged_attention_is_repeatable_at_aya_batch_32_on_cuda():
    """Aya's decode shapes at batch 32 with ragged lengths (many splits each): close to the
    float64 reference, and 200 back-to-back launches all bitwise equal to the first."""
    import cohere_compile  # noqa: F401
    from cohere_compile.ops import reference as R

    dev, bs, hkv, h, d, rows, max_blocks = "cuda", 256, 8, 32, 128, 32, 9
    g = torch.Generator(device=dev).manual_seed(0)
    lens = torch.randint(1, max_blocks * bs, (rows,), device=dev, generator=g, dtype=torch.int32)
    k_pool = torch.randn(rows * max_blocks, hkv, bs, d, device=dev, dtype=torch.bfloat16, generator=g)
    v_pool = torch.randn(k_pool.shape, device=dev, dtype=torch.bfloat16, generator=g)
    table = torch.randperm(rows * max_blocks, device=dev, generator=g).view(rows, max_blocks).int()
    q = torch.randn(rows, h, 1, d, device=dev, dtype=torch.bfloat16, generator=g)
    first = torch.ops.cohere.paged_attention(q, k_pool, v_pool, table, lens, None, d ** -0.5)
    ref = R.paged_attention(q.double(), k_pool.double(), v_pool.double(), table, lens, None, d ** -0.5)
    assert _rel(first, ref) < 1e-2
    outs = [torch.ops.cohere.paged_attention(q, k_pool, v_pool, table, lens, None, d ** -0.5) for _ in range(200)]
    assert all(torch.equal(o, first) for o in outs)


def _hf_greedy_case(use_qk_norm, kv_heads, lengths, new_tokens, prompt_seed, device="cuda"):
    """A tiny fp32 Cohere model on CUDA (greedy ties stay rare) with random LayerNorm and QK-norm
    weights (since 2026-12-04: HF's all-ones init hid a misbound norm weight), random prompts of
    ``lengths`` and HF's greedy continuation of each. (Also bench/generate_parity.py's case.)"""
    import transformers

    cfg = transformers.CohereConfig(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=kv_heads, use_qk_norm=use_qk_norm,
                                    logit_scale=1.0, initializer_range=0.2, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(cfg)
    with torch.no_grad():  # norm weights not all ones, so a misbound norm weight changes the tokens
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                torch.nn.init.normal_(p, 1.0, 0.1)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(prompt_seed)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    refs = [model.generate(p[None].to(device), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return model, prompts, refs


def first_difference(got, refs) -> list:
    """Per prompt: the index of the first token unlike HF's, or None. (Also bench/generate_parity.py's.)"""
    return [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), None if len(g) == len(r) else min(len(g), len(r)))
            for g, r in zip(got, refs)]


def _first_differences(got, refs) -> list:
    """(prompt, first differing step, ours, HF's) for each prompt whose tokens differ."""
    return [(i, step, got[i][step:step + 3], refs[i][step:step + 3])
            for i, step in enumerate(first_difference(got, refs)) if step is not None]


# one change of setting each, to bisect a mismatch of cc.generate's CUDA path
DIAGNOSIS_VARIANTS = {"again": {}, "no_cuda_graphs": {"cuda_graphs": False},
                      "custom_op_pdl_off": {"custom_op_pdl": False}, "unmerged": {"merge_projections": False},
                      "no_qk_norm_rope": {"passes": ["causal_attention", "swiglu"]},
                      # coordinate-descent tuning picks kernel configs by timing, which could explain a failure that
                      # comes and goes between runs of the same code
                      "no_coordinate_descent": {"inductor_options": {"coordinate_descent_tuning": False}},
                      "eager": {"compiled": False}}


def _diagnosis(model, prompts, refs, new_tokens, got, rewrites, **kwargs) -> str:
    """What a failing comparison with HF says (the known intermittent QK-norm + GQA failure,
    README "Open" under Decoding): the first differing step per prompt, the failing call's
    rewrites, and which single change of setting (each compiled afresh) gives HF's tokens."""
    import cohere_compile as cc

    lines = [f"differences (prompt, step, ours, HF): {_first_differences(got, refs)}", f"rewrites: {rewrites}"]
    for name, change in DIAGNOSIS_VARIANTS.items():
        options = {**kwargs.get("inductor_options", {}), **change.get("inductor_options", {})}
        with torch._inductor.config.patch(force_disable_caches=True):
            other = cc.generate(model, prompts, new_tokens, **{**kwargs, **change, "inductor_options": options})
        lines.append(f"{name}: {'matches HF' if other == refs else _first_differences(other, refs)}")
    return "\n".join(lines)


@pytest.mark.parametrize("use_qk_norm,kv_heads", [(False, 2), (True, 4)])
def test_generate_matches_hf_greedy_on_cuda(use_qk_norm, kv_heads):
    import cohere_compile as cc

    model, prompts, refs = _hf_greedy_case(use_qk_norm, kv_heads, (5, 70, 13, 300), 20, prompt_seed=1)
    stats = {}
    got = cc.generate(model, prompts, 20, stop_tokens=(), block_size=64, max_batch_size=3, stats=stats)
    assert got == refs
    assert stats["decode_steps"] > 0
    # with qk_norm_rope on, each layer's rotation and cache write are one op in the decode graph
    from cohere_compile.passes import recording

    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        fused = cc.generate(model, prompts, 20, stop_tokens=(), block_size=64, max_batch_size=3,
                            passes=["qk_norm_rope"])
    assert fused == refs
    assert any(r.get("rope_kv_write") == 2 and r["paged_attention"] == 2 for r in rewrites), rewrites


@pytest.mark.parametrize("pdl", [False, True])
def test_generate_with_and_without_pdl_matches_hf_greedy_on_cuda(pdl):
    """Inductor's Programmatic Dependent Launch (the CUDA decode default since 2026-12-03;
    ``inductor_options={"triton.enable_pdl": False}`` opts out) on and off, on a batch where a
    third prompt joins a two-row cache. Open (2026-12-02): PDL on passed twice; PDL on and PDL
    off each failed once, their tokens unlike HF's from the first decode step; every re-run on a
    later lease passed (bench/results/logs/generate_gpu_rerun_2026-12-02b.log, gpu_tests_2026-12-03.log)."""
    import cohere_compile as cc
    from cohere_compile.generate import CUDA_DECODE_INDUCTOR

    assert CUDA_DECODE_INDUCTOR["triton.enable_pdl"] is True
    from cohere_compile.passes import recording

    model, prompts, refs = _hf_greedy_case(True, 2, (9, 130, 40), 24, prompt_seed=2)
    kwargs = dict(stop_tokens=(), block_size=64, max_batch_size=2, inductor_options={"triton.enable_pdl": pdl})
    with recording() as rewrites:
        got = cc.generate(model, prompts, 24, **kwargs)
    if got != refs:
        pytest.fail(_diagnosis(model, prompts, refs, 24, got, rewrites, **kwargs))
