"""Each ``cohere::`` op (Triton kernel through the interpreter, TRITON_INTERPRET=1)
against an independent float64 reference written here, plus the plain-torch CPU path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cohere_compile
from cohere_compile.ops import reference
from conftest import rel_err

ops = torch.ops.cohere
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
EPS = 1e-5


# ---------------------------------------------------------------- float64 references


def ref_layer_norm(x, weight, eps=EPS):
    """Cohere LayerNorm: mean-centred, rsqrt(var + eps), times weight, no bias."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double()


def ref_head_norm(x, weight, eps=EPS):
    """x: (B, H, T, D); weight: (H, D). Normalise every head over head_dim."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double()[None, :, None, :]


def ref_rope(x, cos, sin):
    """Interleaved RoPE. x: (B, H, T, D); cos, sin: (B|1, T, D)."""
    x = x.double()
    cos, sin = cos.double()[:, None], sin.double()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos[..., 0::2] - odd * sin[..., 0::2]
    out[..., 1::2] = odd * cos[..., 1::2] + even * sin[..., 1::2]
    return out


def ref_swiglu(gate, up):
    g = gate.double()
    return g / (1 + torch.exp(-g)) * up.double()


def ref_attention(q, k, v, mask, scale, is_causal):
    """softmax(q k^T * scale + mask) v, k and v repeated per GQA group."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = torch.repeat_interleave(k, group, dim=1)
    v = torch.repeat_interleave(v, group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    if is_causal:
        q_len, kv_len = scores.shape[-2:]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ---------------------------------------------------------------- input helpers


def heads_view(b, h, t, d, dtype, transposed=True):
    """(B, H, T, D), by default a non-contiguous view of a (B, T, H, D) tensor."""
    if transposed:
        return torch.randn(b, t, h, d).to(dtype).transpose(1, 2)
    return torch.randn(b, h, t, d).to(dtype)


def visibility(b, q_len, kv_len, seed, fully_masked_row=None):
    """A random (B, 1, Q, K) bool mask (True = attend) where most rows see some keys."""
    g = torch.Generator().manual_seed(seed)
    visible = torch.rand(b, 1, q_len, kv_len, generator=g) > 0.35
    if fully_masked_row is not None:
        visible[0, 0, fully_masked_row] = False
    return visible


def hf_additive(visible, dtype):
    """An additive mask as Hugging Face builds it: 0 where visible, finfo.min where masked."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)


def seen_rows(visible, b, h, q_len, is_causal=False, kv_len=None):
    """(B, H, Q) bool: query rows that see at least one key."""
    if visible is None:
        visible = torch.ones(b, 1, q_len, kv_len, dtype=torch.bool)
    if is_causal:
        visible = visible & torch.ones(q_len, visible.shape[-1], dtype=torch.bool).tril()
    return visible.any(-1).expand(b, h, q_len)


def check_attention(q, k, v, mask, is_causal, rows, dtype):
    scale = q.shape[-1] ** -0.5
    out = ops.flash_attention(q, k, v, mask, scale, is_causal)
    ref = ref_attention(q, k, v, mask, scale, is_causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert rows.any()
    assert rel_err(out[rows], ref[rows]) < TOL[dtype]


# ---------------------------------------------------------------- layer norm


@settings(max_examples=5, deadline=None)
@given(
    lead=st.lists(st.integers(1, 7), min_size=1, max_size=2),
    hidden=st.integers(2, 300),
    dtype=st.sampled_from(DTYPES),
)
def test_layer_norm_matches_reference(lead, hidden, dtype):
    x = torch.randn(*lead, hidden).to(dtype)
    w = torch.empty(hidden).normal_(1.0, 0.3).to(dtype)
    out = ops.layer_norm(x, w, EPS)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref_layer_norm(x, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_non_contiguous_input(dtype):
    x = torch.randn(77, 2, 9).to(dtype).permute(1, 2, 0)  # (2, 9, 77), last dim strided
    assert not x.is_contiguous()
    w = torch.empty(77).normal_(1.0, 0.3).to(dtype)
    out = ops.layer_norm(x, w, EPS)
    assert rel_err(out, ref_layer_norm(x, w)) < TOL[dtype]


def test_layer_norm_tensor_eps_twin():
    x, w = torch.randn(3, 5, 77), torch.randn(77)
    out = ops.layer_norm_tensor_eps(x, w, torch.tensor(1e-3))
    assert rel_err(out, ref_layer_norm(x, w, eps=1e-3)) < 1e-5


def test_layer_norm_uses_eps():
    x = torch.randn(4, 77) * 1e-2  # variance ~1e-4: eps=1e-1 changes the result a lot
    w = torch.ones(77)
    out = ops.layer_norm(x, w, 1e-1)
    assert rel_err(out, ref_layer_norm(x, w, eps=1e-1)) < 1e-5
    assert rel_err(out, ref_layer_norm(x, w, eps=EPS)) > 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_add3_layer_norm_matches_reference(dtype):
    shape = (2, 13, 77)
    residual, attn, mlp = (torch.randn(shape).to(dtype) for _ in range(3))
    w = torch.empty(77).normal_(1.0, 0.3).to(dtype)
    h, out = ops.add3_layer_norm(residual, attn, mlp, w, EPS)
    h_ref = residual.double() + attn.double() + mlp.double()
    assert h.dtype == dtype and out.dtype == dtype
    assert rel_err(h, h_ref) < TOL[dtype]
    assert rel_err(out, ref_layer_norm(h_ref, w)) < TOL[dtype]


def test_add3_layer_norm_non_contiguous_inputs():
    residual = torch.randn(77, 9).t()
    attn = torch.randn(9, 154)[:, ::2]
    mlp = torch.randn(9, 77)
    w = torch.randn(77)
    h, out = ops.add3_layer_norm(residual, attn, mlp, w, EPS)
    h_ref = residual.double() + attn.double() + mlp.double()
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(out, ref_layer_norm(h_ref, w)) < 1e-5


# ---------------------------------------------------------------- qk norm + rope


def rope_inputs(dtype, b=2, t=9, hq=6, hk=2, d=24, cos_batch=1):
    q = heads_view(b, hq, t, d, dtype)
    k = heads_view(b, hk, t, d, dtype)
    # Arbitrary cos/sin (not paired): checks that element 2i and 2i+1 each use their own.
    cos = torch.randn(cos_batch, t, d).to(dtype)
    sin = torch.randn(cos_batch, t, d).to(dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk", [2, 3, 6])
def test_rope_without_norm(dtype, hk):
    q, k, cos, sin = rope_inputs(dtype, hk=hk)
    q_out, k_out = ops.qk_norm_rope(q, k, None, None, cos, sin, 0.0)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == dtype and k_out.dtype == dtype
    assert rel_err(q_out, ref_rope(q, cos, sin)) < TOL[dtype]
    assert rel_err(k_out, ref_rope(k, cos, sin)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk", [2, 3, 6])
def test_qk_norm_rope_with_weights(dtype, hk):
    q, k, cos, sin = rope_inputs(dtype, t=13, hk=hk, cos_batch=2)
    qw = torch.empty(6, 24).normal_(1.0, 0.3).to(dtype)
    kw = torch.empty(hk, 24).normal_(1.0, 0.3).to(dtype)
    q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    assert rel_err(q_out, ref_rope(ref_head_norm(q, qw), cos, sin)) < TOL[dtype]
    assert rel_err(k_out, ref_rope(ref_head_norm(k, kw), cos, sin)) < TOL[dtype]


@pytest.mark.parametrize("target", [1, 12, 10**6], ids=["per_token", "chunks_of_2_and_4", "per_head"])
def test_qk_norm_rope_kernel_splits_heads_into_chunks(target):
    """The launch's head chunks (decode steps on the GPU use small ones; the interpreter defaults
    to one program per token): 6 tokens, 6 q / 3 k heads; at 12 programs q runs in chunks of 4
    and k of 2, the last chunk of each partly masked."""
    from cohere_compile.kernels import rope as rope_kernel

    q, k, cos, sin = rope_inputs(torch.float32, b=2, t=3, hk=3, cos_batch=2)
    qw, kw = torch.empty(6, 24).normal_(1.0, 0.3), torch.empty(3, 24).normal_(1.0, 0.3)
    for weights, norm in (((qw, kw), lambda x, w: ref_head_norm(x, w)), ((None, None), lambda x, w: x)):
        q_out, k_out = rope_kernel.qk_norm_rope(q, k, *weights, cos, sin, EPS, target_programs=target)
        assert rel_err(q_out, ref_rope(norm(q, weights[0]), cos, sin)) < 1e-5
        assert rel_err(k_out, ref_rope(norm(k, weights[1]), cos, sin)) < 1e-5


def test_qk_norm_rope_contiguous_inputs_and_tensor_eps():
    q, k = heads_view(1, 6, 5, 24, torch.float32, False), heads_view(1, 3, 5, 24, torch.float32, False)
    cos, sin = torch.randn(1, 5, 24), torch.randn(1, 5, 24)
    qw, kw = torch.randn(6, 24), torch.randn(3, 24)
    q_out, k_out = ops.qk_norm_rope_tensor_eps(q, k, qw, kw, cos, sin, torch.tensor(1e-2))
    assert rel_err(q_out, ref_rope(ref_head_norm(q, qw, 1e-2), cos, sin)) < 1e-5
    assert rel_err(k_out, ref_rope(ref_head_norm(k, kw, 1e-2), cos, sin)) < 1e-5


def test_qk_norm_rope_tensor_eps_takes_k_eps_apart():
    """Under dynamic=True each norm's eps is its own graph input, so the pass hands k's eps over
    separately; a large gap between the two shows each head group uses its own."""
    q, k, cos, sin = rope_inputs(torch.float32, t=5, hk=3)
    qw, kw = torch.empty(6, 24).normal_(1.0, 0.3), torch.empty(3, 24).normal_(1.0, 0.3)
    q_out, k_out = ops.qk_norm_rope_tensor_eps(q, k, qw, kw, cos, sin, torch.tensor(1e-5), torch.tensor(0.5))
    assert rel_err(q_out, ref_rope(ref_head_norm(q, qw, 1e-5), cos, sin)) < 1e-5
    assert rel_err(k_out, ref_rope(ref_head_norm(k, kw, 0.5), cos, sin)) < 1e-5
    assert rel_err(k_out, ref_rope(ref_head_norm(k, kw, 1e-5), cos, sin)) > 1e-2


def test_qk_norm_rope_odd_head_dim_raises():
    q, k = torch.randn(1, 2, 3, 7), torch.randn(1, 2, 3, 7)
    cos, sin = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    with pytest.raises(ValueError, match="head_dim"):
        ops.qk_norm_rope(q, k, None, None, cos, sin, 0.0)


def test_qk_norm_rope_one_weight_raises():
    q, k, cos, sin = rope_inputs(torch.float32)
    with pytest.raises(ValueError, match="both"):
        ops.qk_norm_rope(q, k, torch.randn(6, 24), None, cos, sin, EPS)


def test_qk_norm_weights_of_the_other_tensor_raise_in_every_op_and_at_compile():
    """Under GQA q's and k's norm weights differ in shape, and the kernels index a weight by head
    without bounds: swapped weights (a pass binding k_norm's weight to q) would read past k's
    weight. Every QK-norm op refuses them eagerly and in its fake implementation (compile time)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    qw, kw = torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g)
    cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    pools = torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8)
    slots = torch.tensor([[0, 1, 2]])
    calls = {
        "qk_norm_rope": lambda a, b: torch.ops.cohere.qk_norm_rope(q, k, a, b, cos, sin, EPS),
        "qk_norm_rope_tensor_eps": lambda a, b: torch.ops.cohere.qk_norm_rope_tensor_eps(
            q, k, a, b, cos, sin, torch.tensor(EPS)),
        "qk_norm_rope_kv_write": lambda a, b: torch.ops.cohere.qk_norm_rope_kv_write(
            q, k, k, a, b, cos, sin, EPS, *(p.clone() for p in pools), slots),
        "qk_norm_rope_backward": lambda a, b: torch.ops.cohere.qk_norm_rope_backward(
            torch.randn_like(q), torch.randn_like(k), q, k, a, b, cos, sin, EPS),
    }
    for name, call in calls.items():
        call(qw, kw)  # the right weights run
        with pytest.raises(ValueError, match="q_weight has shape \\(2, 8\\), but q has 4 heads"):
            call(kw, qw)
        with pytest.raises(Exception, match="q_weight has shape"):  # the fake implementation, at trace time
            torch.compile(call, backend="eager", fullgraph=True)(kw, qw)


# ---------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(dtype):
    gate = torch.randn(3, 13, 77).to(dtype) * 3
    up = torch.randn(3, 13, 77).to(dtype)
    out = ops.swiglu(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    assert rel_err(out, ref_swiglu(gate, up)) < TOL[dtype]


def test_swiglu_non_contiguous_inputs_larger_than_one_block():
    gate = torch.randn(77, 2, 13).permute(1, 2, 0)  # 2002 elements: > one 1024 block
    up = torch.randn(2, 13, 154)[..., 1::2]
    out = ops.swiglu(gate, up)
    assert rel_err(out, ref_swiglu(gate, up)) < 1e-5


def test_swiglu_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ops.swiglu(torch.randn(2, 8), torch.randn(2, 9))


# ---------------------------------------------------------------- flash attention

HEADS = [(6, 2), (6, 3), (6, 6)]


@settings(max_examples=5, deadline=None)
@given(
    heads=st.sampled_from(HEADS),
    batch=st.integers(1, 2),
    q_len=st.sampled_from([1, 5, 9, 13]),
    extra_kv=st.sampled_from([0, 4, 24]),
    head_dim=st.sampled_from([8, 24, 40]),
    dtype=st.sampled_from(DTYPES),
)
def test_attention_no_mask_shapes(heads, batch, q_len, extra_kv, head_dim, dtype):
    h, hkv = heads
    kv_len = q_len + extra_kv
    q = heads_view(batch, h, q_len, head_dim, dtype)
    k = heads_view(batch, hkv, kv_len, head_dim, dtype)
    v = heads_view(batch, hkv, kv_len, head_dim, dtype, transposed=False)
    rows = seen_rows(None, batch, h, q_len, kv_len=kv_len)
    check_attention(q, k, v, None, False, rows, dtype)


@settings(max_examples=5, deadline=None)
@given(
    heads=st.sampled_from(HEADS),
    seq=st.sampled_from([9, 13, 37]),
    mask_kind=st.sampled_from(["none", "bool", "additive"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 1000),
)
def test_attention_causal_shapes(heads, seq, mask_kind, dtype, seed):
    h, hkv = heads
    b = 2
    q, k, v = heads_view(b, h, seq, 24, dtype), heads_view(b, hkv, seq, 24, dtype), heads_view(b, hkv, seq, 24, dtype)
    visible = None if mask_kind == "none" else visibility(b, seq, seq, seed)
    mask = {"none": None, "bool": visible, "additive": None if visible is None else hf_additive(visible, dtype)}[
        mask_kind
    ]
    rows = seen_rows(visible, b, h, seq, is_causal=True, kv_len=seq)
    check_attention(q, k, v, mask, True, rows, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
def test_attention_is_causal(dtype, heads):
    h, hkv = heads
    q, k, v = heads_view(2, h, 13, 24, dtype), heads_view(2, hkv, 13, 24, dtype), heads_view(2, hkv, 13, 24, dtype)
    rows = seen_rows(None, 2, h, 13, is_causal=True, kv_len=13)
    check_attention(q, k, v, None, True, rows, dtype)


def test_attention_is_causal_differs_from_unmasked():
    q, k, v = heads_view(1, 6, 9, 24, torch.float32), heads_view(1, 2, 9, 24, torch.float32), heads_view(1, 2, 9, 24, torch.float32)
    causal = ops.flash_attention(q, k, v, None, 0.2, True)
    full = ops.flash_attention(q, k, v, None, 0.2, False)
    assert rel_err(causal[:, :, -1], full[:, :, -1]) < 1e-5  # the last query sees every key
    assert rel_err(causal[:, :, 0], full[:, :, 0]) > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (1, 37), (5, 37)])
def test_attention_bool_mask(dtype, heads, q_len, kv_len):
    h, hkv = heads
    q = heads_view(2, h, q_len, 24, dtype)
    k, v = heads_view(2, hkv, kv_len, 24, dtype), heads_view(2, hkv, kv_len, 24, dtype)
    visible = visibility(2, q_len, kv_len, seed=q_len * 100 + kv_len)
    check_attention(q, k, v, visible, False, seen_rows(visible, 2, h, q_len), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("q_len,kv_len", [(13, 13), (1, 37), (5, 37)])
def test_attention_hf_additive_mask(dtype, heads, q_len, kv_len):
    h, hkv = heads
    q = heads_view(2, h, q_len, 24, dtype)
    k, v = heads_view(2, hkv, kv_len, 24, dtype), heads_view(2, hkv, kv_len, 24, dtype)
    visible = visibility(2, q_len, kv_len, seed=q_len * 100 + kv_len + 7)
    mask = hf_additive(visible, dtype)
    check_attention(q, k, v, mask, False, seen_rows(visible, 2, h, q_len), dtype)


def test_attention_additive_mask_with_finite_bias():
    q, k, v = heads_view(2, 6, 5, 24, torch.float32), heads_view(2, 3, 37, 24, torch.float32), heads_view(2, 3, 37, 24, torch.float32)
    visible = visibility(2, 5, 37, seed=3)
    bias = torch.randn(2, 6, 5, 37)  # per-head bias, plus HF's finfo.min where masked
    mask = bias.masked_fill(~visible, torch.finfo(torch.float32).min)
    check_attention(q, k, v, mask, False, seen_rows(visible, 2, 6, 5), torch.float32)


def test_attention_per_head_bool_mask_and_causal():
    q, k, v = heads_view(2, 6, 13, 24, torch.float32), heads_view(2, 2, 13, 24, torch.float32), heads_view(2, 2, 13, 24, torch.float32)
    visible = torch.rand(2, 6, 13, 13) > 0.3
    rows = (visible & torch.ones(13, 13, dtype=torch.bool).tril()).any(-1)
    check_attention(q, k, v, visible, True, rows, torch.float32)


def test_attention_causal_q_len_shorter_than_kv_is_top_left_aligned():
    """Documented semantics: is_causal is top-left aligned like SDPA's (query i sees keys <= i)."""
    q = heads_view(1, 6, 5, 24, torch.float32)
    k, v = heads_view(1, 2, 37, 24, torch.float32), heads_view(1, 2, 37, 24, torch.float32)
    rows = seen_rows(None, 1, 6, 5, is_causal=True, kv_len=37)
    check_attention(q, k, v, None, True, rows, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_fully_masked_row_is_exactly_zero(dtype, kind):
    q = heads_view(2, 6, 5, 24, dtype)
    k, v = heads_view(2, 2, 37, 24, dtype), heads_view(2, 2, 37, 24, dtype)
    visible = visibility(2, 5, 37, seed=11, fully_masked_row=2)
    mask = visible if kind == "bool" else hf_additive(visible, dtype)
    out = ops.flash_attention(q, k, v, mask, 24**-0.5, False)
    assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))
    assert torch.isfinite(out).all()
    rows = seen_rows(visible, 2, 6, 5)
    assert not rows[0, :, 2].any()
    ref = ref_attention(q, k, v, mask, 24**-0.5, False)
    assert rel_err(out[rows], ref[rows]) < TOL[dtype]


def test_attention_bad_heads_raises():
    q, k = torch.randn(1, 6, 3, 8), torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        ops.flash_attention(q, k, k, None, 1.0, False)


# ---------------------------------------------------------------- unsupported dtypes


def _float64_calls():
    d = torch.float64
    q, k = torch.randn(1, 2, 3, 8, dtype=d), torch.randn(1, 2, 3, 8, dtype=d)
    cs = torch.randn(1, 3, 8, dtype=d)
    x, w = torch.randn(3, 8, dtype=d), torch.randn(8, dtype=d)
    pool = torch.randn(4, 2, 4, 8, dtype=d)  # (blocks, kv heads, block size, head dim)
    table, lens = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    slots = torch.tensor([[0, 1, 2]])
    return {
        "layer_norm": lambda: ops.layer_norm(x, w, EPS),
        "add3_layer_norm": lambda: ops.add3_layer_norm(x, x, x, w, EPS),
        "qk_norm_rope": lambda: ops.qk_norm_rope(q, k, None, None, cs, cs, 0.0),
        "swiglu": lambda: ops.swiglu(x, x),
        "flash_attention": lambda: ops.flash_attention(q, k, k, None, 1.0, False),
        "paged_kv_write": lambda: ops.paged_kv_write(pool, pool.clone(), q, q, slots),
        "paged_gather": lambda: ops.paged_gather(pool, table, lens, 8),
        "paged_attention": lambda: ops.paged_attention(q[:, :, :1], pool, pool, table, lens, None, 1.0),
        "linear_cross_entropy": lambda: ops.linear_cross_entropy(x, torch.randn(5, 8, dtype=d), torch.tensor([0, 1, 2]),
                                                                 1.0, -100, "mean", True, True),
        "int4_linear": lambda: ops.int4_linear(x, torch.zeros(5, 4, dtype=torch.uint8),
                                              torch.ones(5, 1, dtype=d), torch.zeros(5, 1, dtype=d), 8),
        "int4_linear_partials": lambda: ops.int4_linear_partials(x[:1], torch.zeros(5, 4, dtype=torch.uint8),
                                                                torch.ones(5, 1, dtype=d), torch.zeros(5, 1, dtype=d),
                                                                8),
    }


@pytest.mark.parametrize("name", sorted(cohere_compile.ops.OPS))
def test_float64_raises_unsupported_input(name):
    with pytest.raises(cohere_compile.UnsupportedInputError, match="float64|dtype"):
        _float64_calls()[name]()


def test_unsupported_input_error_is_a_type_error():
    assert issubclass(cohere_compile.UnsupportedInputError, TypeError)


# ---------------------------------------------------------------- the plain-torch CPU path


def test_reference_layer_norm_and_add3():
    x, a, m = torch.randn(3, 9, 77), torch.randn(3, 9, 77), torch.randn(3, 9, 77)
    w = torch.empty(77).normal_(1.0, 0.3)
    assert rel_err(reference.layer_norm(x, w, EPS), ref_layer_norm(x, w)) < 1e-5
    h, out = reference.add3_layer_norm(x, a, m, w, EPS)
    h_ref = x.double() + a.double() + m.double()
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(out, ref_layer_norm(h_ref, w)) < 1e-5


def test_reference_rope_and_qk_norm_rope():
    q, k, cos, sin = rope_inputs(torch.float32, hk=3)
    qw, kw = torch.randn(6, 24), torch.randn(3, 24)
    assert rel_err(reference.rope(q, cos, sin), ref_rope(q, cos, sin)) < 1e-5
    q_out, k_out = reference.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    assert rel_err(q_out, ref_rope(ref_head_norm(q, qw), cos, sin)) < 1e-5
    assert rel_err(k_out, ref_rope(ref_head_norm(k, kw), cos, sin)) < 1e-5
    q_out, k_out = reference.qk_norm_rope(q, k, None, None, cos, sin, EPS)
    assert rel_err(q_out, ref_rope(q, cos, sin)) < 1e-5
    assert rel_err(k_out, ref_rope(k, cos, sin)) < 1e-5


def test_reference_swiglu():
    g, u = torch.randn(4, 77) * 3, torch.randn(4, 77)
    assert rel_err(reference.swiglu(g, u), ref_swiglu(g, u)) < 1e-5


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "additive"])
def test_reference_flash_attention(kind):
    q = heads_view(2, 6, 5, 24, torch.float32)
    k, v = heads_view(2, 2, 37, 24, torch.float32), heads_view(2, 2, 37, 24, torch.float32)
    visible = visibility(2, 5, 37, seed=5, fully_masked_row=1) if kind in ("bool", "additive") else None
    mask = {"bool": visible, "additive": None if visible is None else hf_additive(visible, torch.float32)}.get(kind)
    causal = kind == "causal"
    out = reference.flash_attention(q, k, v, mask, 0.2, causal)
    ref = ref_attention(q, k, v, mask, 0.2, causal)
    rows = seen_rows(visible, 2, 6, 5, is_causal=causal, kv_len=37)
    assert rel_err(out[rows], ref[rows]) < 1e-5
    assert torch.equal(out[~rows], torch.zeros_like(out[~rows]))


def test_ops_cpu_path_without_interpreter(monkeypatch):
    """With TRITON_INTERPRET unset, CPU tensors take the plain-torch path of every op."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from cohere_compile.kernels import interpreting

    assert not interpreting()
    x, w = torch.randn(2, 9, 77), torch.randn(77)
    assert rel_err(ops.layer_norm(x, w, EPS), ref_layer_norm(x, w)) < 1e-5
    h, out = ops.add3_layer_norm(x, x, x, w, EPS)
    assert rel_err(out, ref_layer_norm(3 * x.double(), w)) < 1e-5
    q, k, cos, sin = rope_inputs(torch.float32, hk=2)
    qw, kw = torch.randn(6, 24), torch.randn(2, 24)
    q_out, k_out = ops.qk_norm_rope(q, k, qw, kw, cos, sin, EPS)
    assert rel_err(q_out, ref_rope(ref_head_norm(q, qw), cos, sin)) < 1e-5
    assert rel_err(k_out, ref_rope(ref_head_norm(k, kw), cos, sin)) < 1e-5
    g = torch.randn(5, 77)
    assert rel_err(ops.swiglu(g, x[0, :5]), ref_swiglu(g, x[0, :5])) < 1e-5
    kk, vv = heads_view(2, 2, 37, 24, torch.float32), heads_view(2, 2, 37, 24, torch.float32)
    qq = heads_view(2, 6, 5, 24, torch.float32)
    visible = visibility(2, 5, 37, seed=9)
    rows = seen_rows(visible, 2, 6, 5)
    out = ops.flash_attention(qq, kk, vv, hf_additive(visible, torch.float32), 0.2, False)
    assert rel_err(out[rows], ref_attention(qq, kk, vv, hf_additive(visible, torch.float32), 0.2, False)[rows]) < 1e-5
