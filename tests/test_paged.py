"""Paged KV cache: the Triton ops against torch references, the cache's bookkeeping and
errors, HF generate through it, cc.generate against HF greedy decoding, and the
paged_attention pass."""

import pytest
import torch
from conftest import assert_rope_kv_write_matches_reference, make_model, rel_err, tiny_config

import cohere_compile as cc
from cohere_compile.ops import reference


# ---------------------------------------------------------------- ops ----
def _pools(n_blocks, hkv, bs, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_blocks, hkv, bs, d, generator=g).to(dtype),
            torch.randn(n_blocks, hkv, bs, d, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (3, 3)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "per_head"])
def test_paged_attention_matches_reference(dtype, heads, kv_heads, mask_kind):
    bs, d, max_blocks = 16, 24, 5
    k_pool, v_pool = _pools(23, kv_heads, bs, d, dtype)
    g = torch.Generator().manual_seed(1)
    table = torch.randperm(23, generator=g)[: 4 * max_blocks].view(4, max_blocks).int()
    table[3, 2:] = -1  # a short sequence with unallocated blocks
    lens = torch.tensor([37, 1, 80, 0], dtype=torch.int32)  # mid-block, one token, full, idle row
    lens[3] = 29
    q = torch.randn(4, heads, 1, d, generator=g).to(dtype)
    view = max_blocks * bs
    keep = torch.rand(4, heads if mask_kind == "per_head" else 1, 1, view + 5, generator=g) > 0.25
    mask = {"none": None, "bool": keep, "per_head": keep,
            "additive": torch.where(keep, torch.randn(keep.shape, generator=g), torch.finfo(dtype).min).to(dtype)}[mask_kind]
    out = torch.ops.cohere.paged_attention(q, k_pool, v_pool, table, lens, mask, 0.3)
    ref_mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
    ref = reference.paged_attention(q.double(), k_pool.double(), v_pool.double(), table, lens, ref_mask, 0.3)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("balance,target", [(True, 10_000), (True, 2), (True, 12), (False, 10_000), (False, 2)])
def test_paged_attention_kernel_merges_many_splits(dtype, balance, target):
    """Many splits (one per 16-key tile when ``target`` is large), one split per sequence
    (``target`` 2: no spare slots), and a few slots shared by length (12): the merge kernel
    combines them; a sequence within one split, an idle row, one long sequence among short
    ones (the balanced plan gives it most of the splits), and a second launch with other lengths."""
    from cohere_compile.kernels.paged import paged_decode_attention

    bs, d, hkv, heads, max_blocks = 16, 16, 2, 16, 6
    k_pool, v_pool = _pools(20, hkv, bs, d, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    table = torch.randperm(20, generator=g)[: 3 * max_blocks].view(3, max_blocks).int()
    for lens in ([96, 9, 53], [17, 0, 70], [1, 95, 2]):
        lens = torch.tensor(lens, dtype=torch.int32)
        q = torch.randn(3, heads, 1, d, generator=g).to(dtype)
        out = paged_decode_attention(q, k_pool, v_pool, table, lens, None, 0.25, torch.empty_like(q),
                                     block_n=16, target_programs=target, balance=balance)
        ref = reference.paged_attention(q.double(), k_pool.double(), v_pool.double(), table, lens, None, 0.25)
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert torch.equal(out[1], torch.zeros_like(out[1])) == (int(lens[1]) == 0)


def test_paged_attention_reference_is_plain_attention():
    """The reference itself against attention over hand-gathered positions."""
    k_pool, v_pool = _pools(7, 2, 4, 8, torch.float64)
    table = torch.tensor([[5, 0, 3], [6, 1, -1]], dtype=torch.int32)
    lens = torch.tensor([10, 6], dtype=torch.int32)
    q = torch.randn(2, 4, 1, 8, dtype=torch.float64)
    out = reference.paged_attention(q, k_pool, v_pool, table, lens, None, 0.5)
    for b in range(2):
        pos = torch.arange(int(lens[b]))
        blocks = table[b, pos // 4].long()
        k = k_pool[blocks, :, pos % 4].transpose(0, 1).repeat_interleave(2, 0)  # (H, L, D)
        v = v_pool[blocks, :, pos % 4].transpose(0, 1).repeat_interleave(2, 0)
        probs = torch.softmax(q[b, :, 0, None, :] @ k.transpose(1, 2) * 0.5, -1)
        torch.testing.assert_close(out[b, :, 0], (probs @ v)[:, 0])


def test_paged_attention_sees_nothing_gives_zeros():
    k_pool, v_pool = _pools(4, 1, 16, 8, torch.float32)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    out = torch.ops.cohere.paged_attention(torch.randn(1, 2, 1, 8), k_pool, v_pool, table,
                                           torch.tensor([0], dtype=torch.int32), None, 1.0)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_kv_write_matches_reference(dtype):
    k_pool, v_pool = _pools(9, 3, 4, 10, dtype)
    k = torch.randn(2, 5, 3, 10).to(dtype).transpose(1, 2)  # non-contiguous, like HF's projections
    v = torch.randn(2, 3, 5, 10).to(dtype)
    slots = torch.tensor([[0, 1, 2, 3, 4], [-1, 17, 18, 35, -1]])
    ours, ref = (k_pool.clone(), v_pool.clone()), (k_pool.clone(), v_pool.clone())
    torch.ops.cohere.paged_kv_write(*ours, k, v, slots)
    reference.paged_write(*ref, k, v, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert torch.equal(ours[0][6], k_pool[6])  # untouched block stays
    assert torch.equal(ours[0][4, :, 1], k[1, :, 1])  # slot 17 = block 4, offset 1


@pytest.mark.parametrize("dtype,qk_norm", [(torch.float32, True), (torch.bfloat16, False)])
def test_qk_norm_rope_kv_write_matches_rope_then_write(dtype, qk_norm):
    """The fused op = cohere::qk_norm_rope's reference, then paged_write of the rotated k and v."""
    g = torch.Generator().manual_seed(3)
    k_pool, v_pool = _pools(9, 3, 4, 10, dtype)
    q = torch.randn(2, 5, 6, 10, generator=g).to(dtype).transpose(1, 2)  # GQA 6 / 3, HF's strides
    k = torch.randn(2, 5, 3, 10, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(2, 3, 5, 10, generator=g).to(dtype)
    cos, sin = (torch.randn(1, 5, 10, generator=g).to(dtype) for _ in range(2))
    qw, kw = (torch.randn(h, 10, generator=g).to(dtype) if qk_norm else None for h in (6, 3))
    slots = torch.tensor([[0, 1, 2, 3, 4], [-1, 17, 18, 35, -1]])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ours = assert_rope_kv_write_matches_reference(q, k, v, qw, kw, cos, sin, k_pool, v_pool, slots, tol)
    assert torch.equal(ours[0][6], k_pool[6])  # untouched block stays
    with pytest.raises(ValueError, match="slots"):
        torch.ops.cohere.qk_norm_rope_kv_write(q, k, v, qw, kw, cos, sin, 1e-5, *ours, slots[:, :2])


@pytest.mark.parametrize("target", [12, 10**6], ids=["chunks_of_2_and_4", "per_head"])
def test_qk_norm_rope_kv_write_kernel_in_head_chunks(target):
    """The fused kernel with the small head chunks of a GPU decode step (the interpreter's
    default is one program per token): 6 q / 3 k heads, 6 tokens, idle slots skipped."""
    from cohere_compile.kernels import rope as rope_kernel

    g = torch.Generator().manual_seed(4)
    k_pool, v_pool = _pools(9, 3, 4, 10, torch.float32)
    q = torch.randn(2, 3, 6, 10, generator=g).transpose(1, 2)
    k = torch.randn(2, 3, 3, 10, generator=g).transpose(1, 2)
    v = torch.randn(2, 3, 3, 10, generator=g)
    cos, sin = (torch.randn(1, 3, 10, generator=g) for _ in range(2))
    qw, kw = (torch.randn(h, 10, generator=g) for h in (6, 3))
    slots = torch.tensor([[0, 5, 9], [-1, 17, 30]])
    assert_rope_kv_write_matches_reference(
        q, k, v, qw, kw, cos, sin, k_pool, v_pool, slots, 1e-5,
        fused=lambda *a: rope_kernel.qk_norm_rope_kv_write(*a, target_programs=target))


def test_paged_gather_zeroes_past_length():
    k_pool, _ = _pools(6, 2, 4, 3, torch.float32)
    table = torch.tensor([[2, 5, -1]], dtype=torch.int32)
    dense = torch.ops.cohere.paged_gather(k_pool, table, torch.tensor([6], dtype=torch.int32), 12)
    assert dense.shape == (1, 2, 12, 3)
    assert torch.equal(dense[0, :, :4], k_pool[2]) and torch.equal(dense[0, :, 4:6], k_pool[5, :, :2])
    assert torch.equal(dense[0, :, 6:], torch.zeros(2, 6, 3))


# -------------------------------------------------------------- cache ----
def test_cache_grows_by_blocks_and_reuses_freed_blocks():
    cfg = tiny_config(False, 2)
    cache = cc.PagedKVCache(cfg, max_batch_size=2, max_tokens=40, block_size=4, device="cpu")
    assert cache.num_blocks == 10 and len(cache.layers) == cfg.num_hidden_layers
    cache.host_managed = True
    cache.prepare([0], 5)
    assert cache.row_blocks[0] == [0, 1] and cache.seq_lens[0] == 5
    cache.prepare([0, 1], 3)  # row 0: 8 tokens, still 2 blocks; row 1: 1 block
    assert cache.row_blocks[0] == [0, 1] and cache.row_blocks[1] == [2]
    cache.prepare([0], 1, decode_all_rows=True)  # token 9 opens a third block
    assert cache.row_blocks[0] == [0, 1, 3]
    assert cache.step_slots.view(-1).tolist() == [3 * 4 + 0, -1] and cache.step_lens.tolist() == [9, 0]
    assert cache.block_table[0, :3].tolist() == [0, 1, 3]
    cache.free(0)
    assert cache.seq_lens[0] == 0 and cache.block_table[0].tolist() == [-1] * cache.max_blocks_per_seq
    cache.prepare([0], 6)
    assert sorted(cache.row_blocks[0]) == [0, 1]  # freed blocks come back first


def test_cache_errors_leave_state_untouched():
    cfg = tiny_config(False, 2)
    cache = cc.PagedKVCache(cfg, max_batch_size=2, max_tokens=16, block_size=4, device="cpu", max_seq_len=12)
    cache.prepare([0], 10)
    before = (list(cache.seq_lens), [list(b) for b in cache.row_blocks], list(cache.free_blocks),
              cache.block_table.clone())
    with pytest.raises(cc.SequenceTooLongError, match="max_seq_len 12"):
        cache.prepare([0], 3)
    with pytest.raises(cc.CacheCapacityError, match="larger max_tokens"):
        cache.prepare([1], 12)  # 3 blocks, 1 free
    after = (list(cache.seq_lens), [list(b) for b in cache.row_blocks], list(cache.free_blocks), cache.block_table)
    assert before[:3] == after[:3] and torch.equal(before[3], after[3])
    cache.prepare([1], 4)  # the other row still works
    assert cache.seq_lens == [10, 4]


def test_cache_rejects_other_models_and_bad_sizes():
    with pytest.raises(ValueError, match="Cohere"):
        cc.PagedKVCache(type("Cfg", (), {"model_type": "llama"})(), 1, 16)
    with pytest.raises(ValueError, match="multiple of 64"):
        cc.PagedKVCache(tiny_config(False, 2), 1, 256, block_size=96, device="cpu")


# ------------------------------------------------------ end to end ----
def _model(use_qk_norm, kv_heads, attn="sdpa"):
    cfg = tiny_config(use_qk_norm, kv_heads, attn)
    # sharper logits than the default init, so greedy tokens depend on the context
    cfg.logit_scale, cfg.initializer_range = 1.0, 0.2
    return make_model(cfg)


def _prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _hf_greedy(model, prompt, n):
    out = model.generate(prompt[None], max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("use_qk_norm,kv_heads", [(True, 2), (False, 4)])
def test_hf_generate_with_paged_cache_matches_dynamic_cache(use_qk_norm, kv_heads):
    model = _model(use_qk_norm, kv_heads)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    cache = cc.PagedKVCache(model.config, max_batch_size=2, max_tokens=64, block_size=4, device="cpu")
    out = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(out, ref)
    assert cache.seq_lens == [15, 15]  # 7 prompt + 8 fed back (the 9th token is never fed)


@pytest.mark.parametrize("use_qk_norm,kv_heads", [(True, 2), (False, 4), (True, 4)])
def test_generate_ragged_batch_matches_hf_greedy(use_qk_norm, kv_heads):
    """Eager decode step (compiled=False): the cache, admission and row reuse."""
    model = _model(use_qk_norm, kv_heads)
    prompts = _prompts([5, 11, 3, 8])
    refs = [_hf_greedy(model, p, 10) for p in prompts]
    assert len({tuple(r) for r in refs}) == len(refs)  # the check below can tell sequences apart
    streamed = []
    # 2 rows for 4 prompts: two join after others finish; block_size 4 makes every
    # sequence cross several blocks and reuse freed ones
    out = cc.generate(model, prompts, 10, stop_tokens=(), block_size=4, max_batch_size=2,
                      compiled=False, callback=lambda i, t: streamed.append((i, t)))
    assert out == refs
    for i in range(len(prompts)):
        assert [t for j, t in streamed if j == i] == refs[i]


def test_generate_default_cache_buckets_its_size_so_requests_reuse_graphs(ops_torch_path, monkeypatch):
    """The default cache holds a power of two of blocks per sequence (at least 2): the pool's shape
    is static in the compiled graphs, so a request of another length in the same bucket compiles
    nothing, and one past it compiles for the next bucket."""
    import importlib

    from cohere_compile.passes import recording

    gen = importlib.import_module("cohere_compile.generate")
    assert [gen._bucketed_blocks(b) for b in (0, 1, 2, 3, 4, 5, 9)] == [2, 2, 2, 4, 4, 8, 16]
    built = []
    monkeypatch.setattr(gen, "PagedKVCache", lambda *a, **k: built.append(k["max_seq_len"]) or cc.PagedKVCache(*a, **k))
    model = _model(False, 2)
    compiles = []
    for length in (16, 100, 150, 40):  # + 8 new tokens, blocks of 64: 1, 2, 3, 1 blocks -> 2, 2, 4, 2
        with recording() as graphs, torch._inductor.config.patch(force_disable_caches=True):
            cc.generate(model, [[3 + i % 90 for i in range(length)]], 8, stop_tokens=(), block_size=64)
        compiles.append(len(graphs))
    assert built == [128, 128, 256, 128]
    assert compiles[0] == 2 and compiles[2] >= 1, compiles  # prefill + decode; the new bucket's pool
    assert compiles[1] == compiles[3] == 0, compiles  # another length in a bucket seen before: reused


def test_generate_stop_tokens_and_sampling():
    model = _model(True, 2)
    prompts = _prompts([6, 9])
    refs = [_hf_greedy(model, p, 8) for p in prompts]
    stop = refs[0][3]
    out = cc.generate(model, prompts, 8, stop_tokens=[stop], block_size=4, compiled=False)
    assert out[0] == refs[0][: refs[0].index(stop) + 1]
    assert out[1] == (refs[1][: refs[1].index(stop) + 1] if stop in refs[1] else refs[1])
    # top_k=1 sampling is greedy; a seed makes sampling repeatable
    assert cc.generate(model, prompts, 8, temperature=0.7, top_k=1, stop_tokens=(), compiled=False,
                       block_size=4) == refs
    a = cc.generate(model, prompts, 8, temperature=1.5, top_p=0.9, seed=7, stop_tokens=(), compiled=False)
    b = cc.generate(model, prompts, 8, temperature=1.5, top_p=0.9, seed=7, stop_tokens=(), compiled=False)
    assert a == b and a != refs


@pytest.mark.usefixtures("ops_torch_path")
def test_generate_rejects_bad_requests_before_running():
    model = _model(False, 2)
    cache = cc.PagedKVCache(model.config, max_batch_size=2, max_tokens=32, block_size=4, device="cpu",
                            max_seq_len=16)
    with pytest.raises(ValueError, match="prompt 1 needs 20 cache positions"):
        cc.generate(model, [[5, 6], list(range(3, 13))], 10, cache=cache, compiled=False)
    assert cache.free_blocks == list(range(7, -1, -1)) and cache.seq_lens == [0, 0]
    with pytest.raises(ValueError, match="empty"):
        cc.generate(model, [[]], 4)
    with pytest.raises(TypeError, match="list of token-id lists"):
        cc.generate(model, torch.ones(2, 3, dtype=torch.long), 4)
    with pytest.raises(cc.UnsupportedModelError):
        cc.generate(torch.nn.Linear(2, 2), [[1]], 4)
    with pytest.raises(ValueError, match="unknown pass name"):
        cc.generate(model, [[5, 6]], 2, passes=["swiglu", "bogus"])
    regional = cc.optimize(_model(False, 2), regional=True)
    with pytest.raises(ValueError, match="regional=True"):
        cc.generate(regional, [[5, 6]], 2)
    assert cc.generate(regional, [[5, 6]], 2, compiled=False, stop_tokens=()) == [_hf_greedy(regional, torch.tensor([5, 6]), 2)]


@pytest.mark.parametrize("use_qk_norm,kv_heads,attn,interpreted", [(True, 2, "sdpa", True), (False, 4, "eager", False)])
def test_compiled_decode_uses_paged_attention(use_qk_norm, kv_heads, attn, interpreted, monkeypatch):
    """The compiled decode step: paged_attention rewrites every layer, no graph break, and
    greedy tokens still match HF's. The GQA case runs the kernels through the interpreter, the
    MHA case the ops' torch path (conftest's ops_torch_path)."""
    if not interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model(use_qk_norm, kv_heads, attn)
    prompts = _prompts([7, 4, 10])
    refs = [_hf_greedy(model, p, 6) for p in prompts]
    assert cc.generate(model, prompts, 6, stop_tokens=(), block_size=4, max_batch_size=2) == refs

    cache = cc.PagedKVCache(model.config, max_batch_size=2, max_tokens=64, block_size=4, device="cpu")
    cache.host_managed = True
    cache.prepare([0, 1], 5)
    cache.prepare([0, 1], 1, decode_all_rows=True)
    visible = (torch.arange(cache.max_seq_len)[None, :] < cache.step_lens[:, None])[:, None, None, :]
    mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)  # additive: eager attention adds it
    rep = cc.explain(model, input_ids=torch.tensor([[5], [9]]), position_ids=torch.tensor([[5], [5]]),
                     attention_mask=mask, past_key_values=cache, use_cache=True)
    assert rep.matches["paged_attention"] == model.config.num_hidden_layers
    assert rep.expected["paged_attention"] == model.config.num_hidden_layers
    assert rep.graph_breaks == 0 and "paged_attention" not in rep.missing


def test_generate_passes_choose_its_graphs_and_rope_fuses_into_the_cache_write():  # interpreted: the fused kernel end to end
    """``passes`` replaces cc.optimize's choice for generate's own graphs (paged_attention stays).
    With qk_norm_rope on, each layer's QK-norm + RoPE and the k/v cache write become one op
    (``qk_norm_rope_kv_write``) in the decode graph (in the dynamic prefill graph only where eps
    stayed a float: the tensor-eps op variant is not fused). Greedy tokens still match HF's."""
    from cohere_compile.passes import recording

    model = cc.optimize(_model(True, 2))  # default passes: swiglu among them
    prompts = _prompts([7, 4])
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        tokens = cc.generate(model, prompts, 3, stop_tokens=(), passes=["qk_norm_rope"], block_size=4)
    prefill, decode = rewrites
    assert decode == {"qk_norm_rope": 2, "paged_attention": 2, "rope_kv_write": 2}
    assert prefill["qk_norm_rope"] == 2 and prefill.get("rope_kv_write", 0) in (0, 2) and "swiglu" not in prefill
    assert tokens == [_hf_greedy(model, p, 3) for p in prompts]


def test_generate_warns_only_where_its_cuda_path_is_unverified():
    """QK norm + GQA on CUDA (two GPU parity failures, 2026-12-02, open) warns; other layouts,
    and every layout on CPU, do not."""
    import warnings

    from cohere_compile.generate import warn_if_unverified_on_cuda

    with pytest.warns(UserWarning, match="QK norm and grouped KV heads"):
        warn_if_unverified_on_cuda(tiny_config(True, 2), on_cuda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cfg, on_cuda in ((tiny_config(True, 4), True), (tiny_config(False, 2), True), (tiny_config(True, 2), False)):
            warn_if_unverified_on_cuda(cfg, on_cuda)


def test_generate_adds_the_fused_rope_write_only_on_cuda_and_only_by_default():
    """On CUDA generate's graphs also get qk_norm_rope (so rope_kv_write fuses; measured faster
    on the H200), on CPU they keep cc.optimize's passes; an explicit ``passes`` is taken as given."""
    from cohere_compile.generate import _generate_passes

    model = cc.optimize(_model(False, 2), passes=["swiglu"])
    assert _generate_passes(model, None, on_cuda=False) == ("swiglu", "paged_attention")
    assert _generate_passes(model, None, on_cuda=True) == ("swiglu", "qk_norm_rope", "paged_attention")
    assert _generate_passes(model, ["swiglu"], on_cuda=True) == ("swiglu", "paged_attention")
    assert _generate_passes(model, [], on_cuda=True) == ("paged_attention",)
    with pytest.raises(ValueError, match="unknown pass"):
        _generate_passes(model, ["rope"], on_cuda=True)


@pytest.mark.usefixtures("ops_torch_path")
def test_generate_on_int4_model_matches_its_eager_path():
    """Issue 5's int4 decode runs through the same paged cache and compiled step."""
    model = cc.optimize(_model(True, 2), quantize="int4", group_size=32)
    prompts = _prompts([5, 7])
    eager = cc.generate(model, prompts, 4, stop_tokens=(), block_size=4, compiled=False)
    assert cc.generate(model, prompts, 4, stop_tokens=(), block_size=4) == eager
