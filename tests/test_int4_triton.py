"""The opt-in int4 backend (``int4_kernel="triton"``): our packed layout, the Triton GEMV
(through the interpreter on CPU) against a float64 reference, the quantization against torchao's
tinygemm helpers, and ``cc.optimize(quantize="int4", int4_kernel="triton")`` on a tiny model.
The GPU section at the end (``pytest -m gpu tests/test_int4_triton.py``) runs Aya-8B shapes."""

import re

import pytest
import torch
import transformers

import cohere_compile as cc
from cohere_compile.colocate import all_colocated, ensure_colocated
from cohere_compile.kernels import int4_gemv_m1 as m1
from cohere_compile.kernels import next_pow2
from cohere_compile.kernels.int4_gemv import MAX_M, auto_split_k, int4_gemv
from cohere_compile.kernels.int4_gemv_m1 import int4_gemv_m1
from cohere_compile.ops import int4 as int4_ops
from cohere_compile.ops.int4 import dequantize_int4, pack_int4, unpack_int4
from cohere_compile.passes import PASS_NAMES
from cohere_compile.quant import Int4TritonLinear, quantize_int4, quantize_model
from conftest import make_model, padded_inputs, rel_err, tiny_config

GROUP = 32  # tiny hidden 64 / intermediate 96: the group must divide every in_features
FULL = {"qk_norm_rope": 2, "causal_attention": 0, "attention": 2, "paged_attention": 0, "swiglu": 2, "layer_norm": 3,
        "linear_cross_entropy": 0}  # the unquantized model's counts (test_quant.py)
LINEARS = 7


def reference_matmul(x, packed, scales, zeros, group_size):
    """float64 ``x @ W^T`` with W rebuilt nibble by nibble from the documented layout."""
    n, half = packed.shape
    p = packed.long()
    q = torch.empty(n, 2 * half, dtype=torch.float64)
    q[:, 0::2] = (p % 16).double()  # low nibble: even k
    q[:, 1::2] = (p // 16).double()  # high nibble: odd k
    g = torch.arange(2 * half) // group_size
    w = (q - 8) * scales.double()[:, g] + zeros.double()[:, g]
    return x.double() @ w.t()


def random_layer(n, k, group_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05 + torch.rand(n, 1, generator=g) * 0.02).to(dtype)  # rows off zero
    return quantize_int4(w, group_size)


@pytest.mark.parametrize("m,n,k,group_size,split_k,block_k,dtype,reduce_at_end", [
    (1, 37, 192, 32, 1, 64, torch.float32, None),  # N not a multiple of BLOCK_N, K a partial last chunk
    (1, 37, 192, 32, 1, 64, torch.float32, False),  # M = 1 through the per-chunk reduction
    (3, 50, 256, 64, 1, 128, torch.float32, None),
    (3, 50, 256, 64, 3, 64, torch.float32, None),  # split-K, 4 chunks over 3 slices (last slice shorter)
    (1, 70, 384, 128, None, 128, torch.bfloat16, None),  # auto split-K (few column blocks: split)
    (1, 70, 384, 128, 2, 128, torch.bfloat16, False),
    (3, 21, 256, 32, 2, 128, torch.bfloat16, None),
    (16, 19, 128, 64, 1, 512, torch.float32, None),  # M at the kernel's limit; block_k capped at K
])
def test_kernel_matches_float64_reference(m, n, k, group_size, split_k, block_k, dtype, reduce_at_end):
    packed, scales, zeros = random_layer(n, k, group_size, dtype)
    x = torch.randn(m, k).to(dtype)
    out = int4_gemv(x, packed, scales, zeros, group_size, block_n=16, block_k=block_k, split_k=split_k,
                    reduce_at_end=reduce_at_end)
    assert out.dtype == dtype and out.shape == (m, n)
    err = rel_err(out, reference_matmul(x, packed, scales, zeros, group_size))
    # fp32: the folded scale/zero sums lose a few bits (~1e-6 measured); a wrong nibble or group costs ~1e-1
    assert err < (2e-5 if dtype == torch.float32 else 8e-3), err


@pytest.mark.parametrize("lean", [0, 1, 2], ids=["step", "lean", "lean_deferred"])
@pytest.mark.parametrize("n,k,group_size,block_n,block_k,split_k,prefetch,stages,dtype", [
    (37, 192, 32, 16, 64, 1, True, 1, torch.float32),  # N not a multiple of BLOCK_N, a partial last step
    (37, 192, 32, 16, 64, 1, False, 1, torch.float32),
    (37, 192, 32, 16, 64, 1, False, 3, torch.float32),  # Triton's pipeline (stages > 1), masked
    (64, 256, 64, 32, 128, None, True, 1, torch.float32),  # auto split-K (2 column blocks)
    (70, 384, 128, 32, 128, 2, True, 1, torch.bfloat16),  # 3 steps over 2 slices, the last one shorter
    (70, 384, 128, 32, 128, 2, False, 4, torch.bfloat16),  # the same, pipelined
    (50, 512, 8, 16, 64, 3, True, 1, torch.float32),  # one-word groups
    (128, 1024, 128, 64, 256, 1, False, 1, torch.bfloat16),  # every mask compiled out (EVEN)
    (128, 1024, 128, 64, 256, 1, False, 3, torch.bfloat16),  # EVEN, pipelined
    (21, 256, 256, 8, 128, None, False, 1, torch.float16),  # block_k raised to the group
])
def test_m1_kernel_matches_float64_reference(n, k, group_size, block_n, block_k, split_k, prefetch, stages, dtype,
                                             lean):
    packed, scales, zeros = random_layer(n, k, group_size, dtype, seed=n)
    x = torch.randn(1, k).to(dtype)
    out = int4_gemv_m1(x, packed, scales, zeros, group_size, block_n=block_n, block_k=block_k, split_k=split_k,
                       prefetch=prefetch, stages=stages, lean=lean)  # lean with groups of 8: the plain step
    assert out.dtype == dtype and out.shape == (1, n)
    # each nibble sits 4 bits below 1.0's leading bit, so fp32 keeps ~19 bits of x * q (1e-6 measured)
    err = rel_err(out, reference_matmul(x, packed, scales, zeros, group_size))
    assert err < (2e-5 if dtype == torch.float32 else 8e-3), err


def test_op_runs_the_word_kernel_for_one_row_only(monkeypatch):
    """One row (and groups of >= 8) takes the word-wise kernel; more rows, or 4-wide groups (a group
    is not whole int32 words), the row kernel; both agree with the reference."""
    calls = []
    for name, mod in (("m1", m1), ("rows", int4_ops.kernel)):
        fn = getattr(mod, "int4_gemv_m1" if name == "m1" else "int4_gemv")
        monkeypatch.setattr(mod, fn.__name__, lambda *a, _f=fn, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    for rows, group_size, expect in (((1,), 32, "m1"), ((1, 1), 32, "m1"), ((2,), 32, "rows"), ((1,), 4, "rows")):
        packed, scales, zeros = random_layer(24, 64, group_size, torch.float32, seed=group_size)
        x = torch.randn(*rows, 64)
        out = torch.ops.cohere.int4_linear(x, packed, scales, zeros, group_size)
        assert calls[-1] == expect, (rows, group_size, calls)
        ref = reference_matmul(x.reshape(-1, 64), packed, scales, zeros, group_size).view(*rows, 24)
        assert rel_err(out, ref) < 2e-5
    unaligned = torch.empty(24 * 32 + 1, dtype=torch.uint8)[1:].view(24, 32)  # not 4-byte aligned: rows kernel
    assert not m1.supports(torch.randn(1, 64), unaligned, 32)
    with pytest.raises(ValueError, match="needs one row"):
        int4_gemv_m1(torch.randn(2, 64), *random_layer(24, 64, 32, torch.float32), 32)


def test_m1_auto_split_k_only_for_few_column_blocks():
    assert m1.auto_split_k(n_blocks=32, steps=56) == 9  # down proj at BLOCK_N=128: 264 programs wanted
    assert m1.auto_split_k(n_blocks=112, steps=16) == 1  # gate/up: measured slower split
    assert m1.auto_split_k(n_blocks=64, steps=8) == 1  # k/v at BLOCK_N=16: as fast unsplit
    assert m1.auto_split_k(n_blocks=2, steps=3) == 3  # never more slices than steps


def _loads(ptx: str) -> list[str]:
    return re.findall(r"ld\.global[.\w]*", ptx)


def _int_to_float(ptx: str) -> list[str]:
    return re.findall(r"cvt\.rn\.f32\.[us]\d+", ptx)


def test_kernel_compiles_for_sm90_with_vector_loads():
    """No GPU here, but Triton compiles for one: the kernel must lower to sm_90 PTX that reads the
    packed weights with 16-byte loads (byte-wise loads would waste the bandwidth), convert nibbles
    without int-to-float instructions (quarter rate: they would cap the kernel near half the
    H200's bandwidth), and assemble without register spills."""
    import inspect

    from sm90 import compile_sm90, spec

    default = {k: p.default for k, p in inspect.signature(int4_gemv).parameters.items()}  # what the launcher launches
    sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_on": "i32",
           "stride_os": "i32", "CHUNKS_PER_SPLIT": "i32"}
    rows = (1, 4, 16)
    specs = [spec("cohere_compile.kernels.int4_gemv.int4_gemv_kernel", sig,
                  dict(M=m, BLOCK_M=next_pow2(m), GROUP=128, BLOCK_N=default["block_n"], BLOCK_K=default["block_k"],
                       REDUCE_AT_END=m == 1, PDL=False),
                  {"num_warps": default["num_warps"], "num_stages": default["num_stages"]},
                  divisible=list(sig)[:12]) for m in rows]
    for m, r in zip(rows, compile_sm90(specs)):
        loads = _loads(r["ptx"])
        assert r["rc"] == 0, r["ptxas"]
        assert "ld.global.v4.b32" in loads, (m, sorted(set(loads)))
        assert "ld.global.b8" not in loads and "ld.global.u8" not in loads, (m, sorted(set(loads)))
        assert re.search(r"\b0 bytes spill stores", r["ptxas"]), r["ptxas"]
        assert not _int_to_float(r["ptx"]), (m, _int_to_float(r["ptx"])[:4])


def _k_loop_instructions(sass: str) -> int:
    """SASS instructions in the longest loop (label to backward branch): the K loop."""
    lines = sass.splitlines()
    loops = []  # (label line, backward branch line) of each loop
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m:
            loops += [(j, i) for j in range(i) if lines[j].startswith(m.group(1) + ":")]
    start, end = max(loops, key=lambda p: p[1] - p[0])
    return len([line for line in lines[start:end + 1] if re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", line)])


PIPELINED = dict(block_n=128, block_k=256, num_warps=4, prefetch=False, stages=4, lean=False)  # cp.async pipeline
LEAN = dict(m1.LARGE, lean=1)  # _step_lean: no w >> 16, one FFMA chain per two words
LEAN_SMALL = dict(m1.SMALL, lean=2)  # and the per-step sum over a group's pairs left to the end


@pytest.mark.parametrize("knobs,swiglu,budget", [("LARGE", False, 4.5), ("SMALL", False, 6.0), ("LARGE", True, 4.6),
                                                 ("PIPELINED", False, 4.5), ("LEAN", False, 3.8),
                                                 ("LEAN", True, 3.9), ("LEAN_SMALL", False, 4.8)])
def test_m1_kernel_spends_few_instructions_per_weight_on_sm90(knobs, swiglu, budget):
    """The word-wise kernel exists to cut the K loop's instructions per weight (the row kernel's
    ~8.2 held it near 1.6 TB/s on the H200): compiled for sm_90 here, its K loop must stay within
    ``budget`` SASS instructions per weight (when written: 3.9 with the LARGE knobs, the
    bandwidth-bound shapes; 5.7 with SMALL's 16 rows per program, which reuse x less; 5.4 since
    2026-12-04), read the
    words with 16-byte loads, use no int-to-float conversions and not spill. With ``swiglu`` (the
    down projection computing its input from gate and up) the activation is per step, not per
    weight, so the budget barely moves (4.0). ``PIPELINED`` (``stages=4``: Triton's cp.async
    pipeline) copies the words through shared memory 16 bytes at a time instead (4.3); ``LEAN``
    (``_step_lean``) spends 3.71 (3.84 with SwiGLU); ``LEAN_SMALL`` (``lean=2`` at SMALL) 4.70."""
    from sm90 import compile_sm90, spec

    default = {"PIPELINED": PIPELINED, "LEAN": LEAN, "LEAN_SMALL": LEAN_SMALL}.get(knobs) or getattr(m1, knobs)
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
           "K": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_os": "i32", "STEPS_PER_SPLIT": "i32",
           "magic": "i32", "u_ptr": "*bf16"}
    const = dict(GROUP=128, BLOCK_N=default["block_n"], BLOCK_K=default["block_k"], EVEN=True,
                 PREFETCH=default["prefetch"], PDL=False, SWIGLU=swiglu, STAGES=default["stages"],
                 LEAN=default["lean"])
    (r,) = compile_sm90([spec("cohere_compile.kernels.int4_gemv_m1.int4_gemv_m1_kernel", sig, const,
                              {"num_warps": default["num_warps"], "num_stages": default["stages"]},
                              divisible=[*list(sig)[:10], "u_ptr"])])  # Aya shapes: all divisible by 16
    assert r["rc"] == 0, r["ptxas"]
    if default["stages"] > 1:  # the words go through shared memory, 16 bytes per copy
        assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], 0x10", r["ptx"]), \
            sorted(set(re.findall(r"cp\.async\S*", r["ptx"])))
    else:
        assert "ld.global.v4.b32" in _loads(r["ptx"]), sorted(set(_loads(r["ptx"])))
    assert re.search(r"\b0 bytes spill stores", r["ptxas"]), r["ptxas"]
    assert not _int_to_float(r["ptx"]), _int_to_float(r["ptx"])[:4]
    weights_per_thread = const["BLOCK_N"] * const["BLOCK_K"] / (32 * default["num_warps"])
    per_weight = _k_loop_instructions(r["sass"]) / weights_per_thread
    assert per_weight <= budget, per_weight


def test_auto_split_k_fills_the_gpu_only_when_needed():
    assert auto_split_k(n_blocks=64, chunks=8) == 8  # k/v proj at Aya shapes: N=1024 / 16, K=4096 / 512
    assert auto_split_k(n_blocks=896, chunks=8) == 1  # gate/up: N=14336 already gives 896 programs
    assert auto_split_k(n_blocks=256, chunks=28) == 2  # down: N=4096, K=14336
    assert auto_split_k(n_blocks=1, chunks=3) == 3  # never more slices than chunks


@pytest.mark.parametrize("rows", [(2, 5), (17,)])  # 10 rows: the kernel; 17: dequantize + matmul in the op
def test_op_handles_batched_and_noncontiguous_inputs(rows, monkeypatch):
    monkeypatch.setattr(int4_ops, "DEQUANT_ROWS", 16)  # the large-M path in 3 slices of output features
    packed, scales, zeros = random_layer(45, 128, 64, torch.float32, seed=1)
    x = torch.randn(*rows, 256)[..., ::2]  # non-contiguous
    out = torch.ops.cohere.int4_linear(x, packed, scales, zeros, 64)
    assert out.shape == (*rows, 45)
    ref = reference_matmul(x.reshape(-1, 128), packed, scales, zeros, 64).view(*rows, 45)
    assert rel_err(out, ref) < 2e-5


@pytest.mark.parametrize("n,k,group_size,scale_dtype,out_dtype", [
    (45, 128, 64, torch.float32, torch.float32),  # N not a multiple of the 32-row block, K < BLOCK_K
    (70, 640, 32, torch.bfloat16, torch.float32),  # K a partial last block (640 = 2.5 x 256)
    (33, 256, 256, torch.bfloat16, torch.bfloat16),  # one group per row block; stored in bf16
    (8, 1024, 512, torch.float16, torch.float16),  # groups larger than BLOCK_K
])
def test_dequant_kernel_matches_the_layout(n, k, group_size, scale_dtype, out_dtype):
    """The prefill path's one-pass dequantization (kernels/int4_dequant.py, interpreted) = the
    layout's definition ``dequantize_int4`` (fp32), rounded once to the output dtype."""
    from cohere_compile.kernels.int4_dequant import dequantize

    packed, scales, zeros = random_layer(n, k, group_size, scale_dtype, seed=5)
    w = dequantize(packed, scales, zeros, group_size, out_dtype)
    ref = dequantize_int4(packed, scales, zeros, group_size)
    assert w.dtype == out_dtype and w.shape == (n, k)
    # fp32: equal up to a fused multiply-add's last bit; bf16 / fp16: one rounding of that
    tol = 1e-6 if out_dtype == torch.float32 else (2 ** -8 if out_dtype == torch.bfloat16 else 2 ** -11)
    assert torch.allclose(w.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert rel_err(w, ref) < tol


def test_large_m_path_runs_the_dequant_kernel(monkeypatch):
    """More rows than the GEMVs take: the op dequantizes through the Triton kernel where Triton
    runs (here the interpreter), in slices of DEQUANT_ROWS output features."""
    from cohere_compile.kernels import int4_dequant

    calls = []
    real = int4_dequant.dequantize
    monkeypatch.setattr(int4_dequant, "dequantize", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(int4_ops, "DEQUANT_ROWS", 16)
    packed, scales, zeros = random_layer(40, 128, 32, torch.float32, seed=6)
    x = torch.randn(MAX_M + 1, 128)
    out = torch.ops.cohere.int4_linear(x, packed, scales, zeros, 32)
    assert calls == [(16, 64), (16, 64), (8, 64)]
    assert rel_err(out, reference_matmul(x, packed, scales, zeros, 32)) < 2e-5


def test_op_gradient_reaches_the_input_only():
    """The int4 weights are frozen; the input gets ``grad_out @ W`` (a frozen layer under trainable ones)."""
    packed, scales, zeros = random_layer(24, 128, 32, torch.float32, seed=4)
    x = torch.randn(2, 3, 128, requires_grad=True)
    grad_out = torch.randn(2, 3, 24)
    torch.ops.cohere.int4_linear(x, packed, scales, zeros, 32).backward(grad_out)
    w = dequantize_int4(packed, scales, zeros, 32).double()
    assert rel_err(x.grad, grad_out.double() @ w) < 1e-5


def test_pack_unpack_layout_and_round_trip():
    q = torch.randint(0, 16, (7, 64), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert int(packed[3, 5]) == int(q[3, 10]) + 16 * int(q[3, 11])  # even k low nibble, odd k high
    assert torch.equal(unpack_int4(packed), q)
    every_byte = torch.arange(256, dtype=torch.uint8).view(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_quantization_is_tinygemm_math_bit_for_bit(dtype, group_size):
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _quantize_affine_tinygemm)

    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, scales, zeros = quantize_int4(w, group_size)
    block = (1, group_size)
    s, z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15)
    q = _quantize_affine_tinygemm(w, block, s, z, torch.int32, 0, 15)
    assert torch.equal(scales, s.view(24, -1)) and torch.equal(zeros, z.view(24, -1))
    assert torch.equal(unpack_int4(packed).int(), q)
    # and the dequantized weights sit within 4-bit error of the originals (random normal, 16 levels)
    err = rel_err(dequantize_int4(packed, scales, zeros, group_size), w)
    assert 0.03 < err < 0.15, err


def triton_linears(model):
    return [m for m in model.modules() if isinstance(m, Int4TritonLinear)]


def dequantized_reference(qmodel, cfg, dtype):
    """A plain HF model holding the Int4TritonLinear layers' dequantized weights (untied head)."""
    ref = make_model(cfg, dtype)
    ref.config.tie_word_embeddings = False
    ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if isinstance(module, Int4TritonLinear):
                ref.get_submodule(name).weight.copy_(module.dequantized_weight())
        for name, p in qmodel.named_parameters():
            ref.get_parameter(name).copy_(p)
    return ref


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_bf16_model_swaps_every_linear_and_stays_within_4bit_error():
    """Eager (uncompiled) bf16: the head is its own int4 copy, the embedding a plain lookup."""
    cfg = tiny_config(False, 2)
    model, original = make_model(cfg, torch.bfloat16), make_model(cfg, torch.bfloat16)
    ids, am = padded_inputs(seq=7)  # 14 rows: the GEMV kernel, not the large-M path
    quantize_model(model, "int4", group_size=GROUP, int4_kernel="triton")
    assert len(triton_linears(model)) == LINEARS * cfg.num_hidden_layers + 1
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int4TritonLinear) and model.config.tie_word_embeddings is False
    emb = model.model.embed_tokens.weight
    assert type(emb) is torch.nn.Parameter and torch.equal(emb, original.model.embed_tokens.weight)
    model.tie_weights()  # HF must not re-tie (there is no head weight to tie)
    assert isinstance(model.lm_head, Int4TritonLinear)
    # the five projections' buffers co-locate, one block per buffer name and layer, values unchanged
    before = {n: b.clone() for n, b in model.named_buffers()}
    assert not all_colocated(model)
    assert ensure_colocated(model) == cfg.num_hidden_layers and all_colocated(model)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    attn = model.model.layers[0].self_attn
    assert attn.v_proj.zeros.untyped_storage().data_ptr() == attn.q_proj.zeros.untyped_storage().data_ptr()
    keep = am.bool()
    out = logits(model, input_ids=ids, attention_mask=am)
    deq = logits(dequantized_reference(model, cfg, torch.bfloat16), input_ids=ids, attention_mask=am)
    assert rel_err(out[keep], deq[keep]) < 1e-2  # the reference rounds dequantized weights to bf16
    err = rel_err(out[keep], logits(original, input_ids=ids, attention_mask=am)[keep])
    assert 0.02 < err < 0.3, err  # 4-bit weights, groups of 32 (weight error ~0.1)


def test_optimize_triton_int4_rewrites_matches_and_generates(monkeypatch):
    """fp32, compiled: exact rewrite counts, logits as the dequantized model (the kernel through
    the interpreter), cc.generate compiled gives the tokens of the eager path, which are those of
    the dequantized model's HF generate (the op's torch path: see conftest's ops_torch_path)."""
    cfg = tiny_config(False, 2)
    model = make_model(cfg)
    ids, am = padded_inputs(seq=7)
    assert cc.optimize(model, quantize="int4", int4_kernel="triton", group_size=GROUP, passes=PASS_NAMES) is model
    assert len(triton_linears(model)) == LINEARS * cfg.num_hidden_layers + 1
    ref = dequantized_reference(model, cfg, torch.float32)
    keep = am.bool()
    assert rel_err(logits(model, input_ids=ids, attention_mask=am)[keep],
                   logits(ref, input_ids=ids, attention_mask=am)[keep]) < 1e-5
    explanation = cc.explain(model, ids, attention_mask=am)
    assert explanation.matches == FULL, str(explanation)
    assert explanation.graph_breaks == 0, explanation.break_reasons

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    prompts = [[5, 9, 33, 7], [11, 3, 60]]
    eager = cc.generate(model, prompts, 6, stop_tokens=(), compiled=False)
    assert cc.generate(model, prompts, 6, stop_tokens=()) == eager
    prompt = torch.tensor([prompts[0]])
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = ref.generate(prompt, **greedy)
    assert torch.equal(want[0, 4:], torch.tensor(eager[0]))


def test_merge_pass_runs_colocated_int4_projections_as_one_gemv():
    """Three int4 linears reading one x through co-located buffers become one
    ``cohere::int4_linear`` and slices; separate buffers, or a gap, are left alone."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from cohere_compile.passes.merge_projections import merge_projections

    rows, k, group = (48, 16, 16), 64, 32
    layers = [random_layer(r, k, group, torch.float32, seed=r) for r in rows]
    blocks = [torch.cat(parts) for parts in zip(*layers)]  # packed, scales, zeros, each co-located
    starts = [0, 48, 64]
    views = [[b[s:s + r] for b in blocks] for s, r in zip(starts, rows)]

    def three(x, *bufs):
        return tuple(torch.ops.cohere.int4_linear(x, *bufs[3 * i:3 * i + 3], group) for i in range(3))

    x = torch.randn(1, 1, k)
    flat = [t for v in views for t in v]
    gm = make_fx(three, tracing_mode="fake")(x, *flat)
    gemvs = lambda g: sum(n.target == torch.ops.cohere.int4_linear.default for n in g.graph.nodes)  # noqa: E731
    assert gemvs(gm) == 3 and merge_projections(gm.graph) == 1
    gm.recompile()
    assert gemvs(gm) == 1
    for got, (p, sc, z) in zip(gm(x, *flat), views):
        assert got.shape == (1, 1, p.shape[0])
        assert rel_err(got, reference_matmul(x.view(1, k), p, sc, z, group).view(1, 1, -1)) < 2e-5
    separate = [t.clone() for t in flat]
    gm = make_fx(three, tracing_mode="fake")(x, *separate)
    assert merge_projections(gm.graph) == 0
    gap = 8  # rows left free between the first and second linear in all three blocks
    gapped = [torch.cat([b[:48], torch.zeros_like(b[:gap]), b[48:]]) for b in blocks]
    gapped_views = [[b[s:s + r] for b in gapped] for s, r in zip([0, 48 + gap, 64 + gap], rows)]
    gm = make_fx(three, tracing_mode="fake")(x, *[t for v in gapped_views for t in v])
    assert merge_projections(gm.graph) == 1  # only the second and third, which touch
    gm.recompile()
    assert gemvs(gm) == 2
    for got, (p, sc, z) in zip(gm(x, *[t for v in gapped_views for t in v]), gapped_views):
        assert rel_err(got, reference_matmul(x.view(1, k), p, sc, z, group).view(1, 1, -1)) < 2e-5


def _small_steps(monkeypatch):
    """The SMALL knobs with 32-weight steps: tiny shapes then split K (as Aya's down projection does)."""
    monkeypatch.setattr(m1, "SMALL", {**m1.SMALL, "block_k": 32})


@pytest.mark.parametrize("interpret", [True, False])
def test_partials_op_sums_to_int4_linear(interpret, monkeypatch):
    """``cohere::int4_linear_partials``: fp32 ``[split, N]`` whose sum is int4_linear's result,
    through the kernel (interpreted) and through the torch slices (CPU without the interpreter)."""
    _small_steps(monkeypatch)
    packed, scales, zeros = random_layer(40, 160, 32, torch.float32, seed=7)
    x = torch.randn(1, 1, 160)
    plan = m1.launch_plan(40, 160, 32)
    assert plan["split"] == 5  # 5 steps of 32, 3 column blocks: split
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    parts = torch.ops.cohere.int4_linear_partials(x, packed, scales, zeros, 32)
    assert parts.shape == (5, 40) and parts.dtype == torch.float32
    ref = reference_matmul(x.view(1, 160), packed, scales, zeros, 32)
    assert rel_err(parts.sum(0, keepdim=True), ref) < 2e-5
    w = dequantize_int4(packed, scales, zeros, 32).double()  # each partial is its own K slice
    assert rel_err(parts[2], x.view(160)[64:96].double() @ w[:, 64:96].t()) < 2e-5
    with pytest.raises(ValueError, match="one row"):
        torch.ops.cohere.int4_linear_partials(torch.randn(2, 160), packed, scales, zeros, 32)


@pytest.mark.parametrize("interpret", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partials_op_computes_swiglu_as_it_reads_x(interpret, dtype, monkeypatch):
    """With ``up`` the partials are those of ``swiglu(gate, up) @ W^T``: the activation, rounded as
    the SwiGLU op rounds it, computed by the GEMV (kernel, interpreted) or the torch slices."""
    _small_steps(monkeypatch)
    packed, scales, zeros = random_layer(40, 160, 32, dtype, seed=10)
    g = torch.Generator().manual_seed(11)
    gate, up = (torch.randn(1, 1, 160, generator=g).to(dtype) for _ in range(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    parts = torch.ops.cohere.int4_linear_partials(gate, packed, scales, zeros, 32, up)
    act = torch.ops.cohere.swiglu(gate, up)
    want = torch.ops.cohere.int4_linear_partials(act, packed, scales, zeros, 32)
    assert parts.shape == want.shape == (5, 40)
    assert rel_err(parts, want) < 1e-6  # the same activation values, so the same partials up to fp32 order
    with pytest.raises(ValueError, match="must match the gate"):
        torch.ops.cohere.int4_linear_partials(gate, packed, scales, zeros, 32, up[..., :80])


def test_split_k_pass_sums_partials_in_the_consumer(monkeypatch):
    """A one-row int4 linear whose launch splits K becomes partials + sum + cast (aten ops the
    consumer's kernel absorbs); one that does not split, or two rows, stays."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from cohere_compile.passes.int4_split_k import sum_split_k_in_consumer

    _small_steps(monkeypatch)
    split_layer = random_layer(40, 160, 32, torch.bfloat16, seed=8)  # 5 steps: split
    whole_layer = random_layer(40, 32, 32, torch.bfloat16, seed=9)  # one step: no split

    def f(x, x_short, *bufs):
        return (torch.ops.cohere.int4_linear(x, *bufs[:3], 32) * 2, torch.ops.cohere.int4_linear(x_short, *bufs[3:], 32))

    x, x_short = torch.randn(1, 1, 160, dtype=torch.bfloat16), torch.randn(1, 1, 32, dtype=torch.bfloat16)
    gm = make_fx(f, tracing_mode="fake")(x, x_short, *split_layer, *whole_layer)
    assert sum_split_k_in_consumer(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.ops.cohere.int4_linear_partials.default) == 1
    assert targets.count(torch.ops.cohere.int4_linear.default) == 1  # the unsplit one
    got, short = gm(x, x_short, *split_layer, *whole_layer)
    assert got.shape == (1, 1, 40) and got.dtype == torch.bfloat16
    assert rel_err(got, 2 * reference_matmul(x.view(1, 160), *split_layer, 32)) < 1e-2
    assert torch.equal(short, torch.ops.cohere.int4_linear(x_short, *whole_layer, 32))
    two_rows = make_fx(f, tracing_mode="fake")(torch.randn(2, 160, dtype=torch.bfloat16), x_short, *split_layer,
                                               *whole_layer)
    assert sum_split_k_in_consumer(two_rows.graph) == 0


def test_split_k_pass_fuses_a_swiglu_read_only_by_the_linear(monkeypatch):
    """``int4_linear(swiglu(gate, up))`` -> ``partials(gate, ..., up)`` (the SwiGLU node goes), also
    where K does not split; a SwiGLU output something else reads stays, and its split linear is
    rewritten without the fusion."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from cohere_compile.passes.int4_split_k import sum_split_k_in_consumer

    _small_steps(monkeypatch)
    split_layer = random_layer(40, 160, 32, torch.bfloat16, seed=12)
    whole_layer = random_layer(24, 32, 32, torch.bfloat16, seed=13)  # one step: no split

    def fused(g, u, g2, u2, *bufs):
        return (torch.ops.cohere.int4_linear(torch.ops.cohere.swiglu(g, u), *bufs[:3], 32),
                torch.ops.cohere.int4_linear(torch.ops.cohere.swiglu(g2, u2), *bufs[3:], 32))

    def shared(g, u, *bufs):
        act = torch.ops.cohere.swiglu(g, u)
        return torch.ops.cohere.int4_linear(act, *bufs, 32), act

    gen = torch.Generator().manual_seed(14)
    g, u = (torch.randn(1, 1, 160, generator=gen).to(torch.bfloat16) for _ in range(2))
    g2, u2 = (torch.randn(1, 1, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    targets = lambda gm: [n.target for n in gm.graph.nodes]  # noqa: E731
    gm = make_fx(fused, tracing_mode="fake")(g, u, g2, u2, *split_layer, *whole_layer)
    assert sum_split_k_in_consumer(gm.graph) == 2
    gm.recompile()
    assert torch.ops.cohere.swiglu.default not in targets(gm)
    assert torch.ops.cohere.int4_linear.default not in targets(gm)
    got, got2 = gm(g, u, g2, u2, *split_layer, *whole_layer)
    for out, (gate, up), layer in ((got, (g, u), split_layer), (got2, (g2, u2), whole_layer)):
        want = torch.ops.cohere.int4_linear(torch.ops.cohere.swiglu(gate, up), *layer, 32)
        assert out.shape == want.shape and out.dtype == torch.bfloat16
        assert rel_err(out, want) < 1e-2
    gm = make_fx(shared, tracing_mode="fake")(g, u, *split_layer)
    assert sum_split_k_in_consumer(gm.graph) == 1
    assert targets(gm).count(torch.ops.cohere.swiglu.default) == 1


@pytest.mark.usefixtures("ops_torch_path")
def test_generate_sums_split_k_in_the_decode_graph(monkeypatch):
    """cc.generate on an int4 Triton model whose down projections split K: the decode graph sums
    each layer's partials in its consumer (counted), and the tokens are the eager path's. (The
    pass is told Triton runs here, so the partials op takes its torch slices: the wiring is the
    subject; the kernel is tested above.)"""
    from cohere_compile.passes import int4_split_k, recording

    _small_steps(monkeypatch)
    monkeypatch.setattr(int4_split_k, "use_triton", lambda t: True)
    cfg = tiny_config(False, 2)
    model = make_model(cfg)
    cc.optimize(model, quantize="int4", int4_kernel="triton", group_size=GROUP)
    prompts = [[5, 9, 33, 7]]
    eager = cc.generate(model, prompts, 5, stop_tokens=(), compiled=False)
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        assert cc.generate(model, prompts, 5, stop_tokens=()) == eager
    # with 32-weight steps every tiny weight splits (2-3 steps, few column blocks): in the decode
    # graph all 7 projections of each layer and the LM head; in the prefill graph (symbolic rows)
    # only the LM head, which reads one row there (logits_to_keep=1)
    linears = triton_linears(model)
    assert len(linears) == LINEARS * cfg.num_hidden_layers + 1
    assert all(m1.launch_plan(m.packed.shape[0], 2 * m.packed.shape[1], GROUP)["split"] > 1 for m in linears)
    assert [r.get("int4_split_k", 0) for r in rewrites] == [1, len(linears)], rewrites
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):  # the opt-out
        assert cc.generate(model, prompts, 5, stop_tokens=(), inductor_options={"int4_split_k": False}) == eager
    assert len(rewrites) == 2 and not any("int4_split_k" in r for r in rewrites), rewrites


@pytest.mark.usefixtures("ops_torch_path")
def test_generate_merges_int4_triton_projections_and_matches_eager():
    """cc.generate(merge_projections=True) on an int4 Triton model: one merged GEMV per layer in the
    prefill and the decode graph, the eager path's tokens, also after a buffer moved (generate
    co-locates again before it runs the graphs that read the blocks)."""
    from cohere_compile.passes import recording

    cfg = tiny_config(True, 2)
    model = make_model(cfg)
    cc.optimize(model, quantize="int4", int4_kernel="triton", group_size=GROUP)
    # a first prompt of 4 tokens and a pool of 4 blocks: one prefill graph only because the pool's
    # shape is static (cache/paged_cache.py; duck sizing once tied it to the prompt length)
    prompts = [[5, 9, 33, 7], [11, 3, 60]]
    eager = cc.generate(model, prompts, 6, stop_tokens=(), compiled=False)
    with recording() as rewrites, torch._inductor.config.patch(force_disable_caches=True):
        assert cc.generate(model, prompts, 6, stop_tokens=(), merge_projections=True) == eager
    assert [r["merge_projections"] for r in rewrites] == [cfg.num_hidden_layers] * 2, rewrites
    assert all_colocated(model)
    up = model.model.layers[1].mlp.up_proj
    up.scales = up.scales.clone()  # something moves a buffer: the compiled graphs' view would be stale
    assert not all_colocated(model)
    assert cc.generate(model, prompts, 6, stop_tokens=(), merge_projections=True) == eager
    assert all_colocated(model)


def test_bad_arguments_raise_clear_errors():
    model = make_model(tiny_config(False, 2))
    with pytest.raises(ValueError, match="int4_kernel='cuda' is not supported"):
        cc.optimize(model, quantize="int4", int4_kernel="cuda")
    with pytest.raises(ValueError, match="int4_kernel='triton' applies to quantize='int4' only"):
        cc.optimize(model, int4_kernel="triton")
    with pytest.raises(ValueError, match="int4_kernel='triton' applies to quantize='int4' only"):
        quantize_model(model, "nf4", int4_kernel="triton")
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        quantize_model(model, "int4", group_size=48, int4_kernel="triton")
    with pytest.raises(ValueError, match="in_features=64, not a multiple of group_size=128"):
        quantize_model(model, "int4", group_size=128, int4_kernel="triton")
    assert not triton_linears(model) and model.lm_head.weight is model.model.embed_tokens.weight  # untouched
    with pytest.raises(ValueError, match="has a bias"):
        Int4TritonLinear.from_linear(torch.nn.Linear(64, 8, bias=True), 32)
    quantize_model(model, "int4", group_size=GROUP, int4_kernel="triton")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int4", group_size=GROUP)

    packed, scales, zeros = random_layer(8, 64, 32, torch.float32)
    op = torch.ops.cohere.int4_linear
    with pytest.raises(ValueError, match="x has 48 features, the weight has in_features=64"):
        op(torch.randn(1, 48), packed, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales must be floating \[N, K // group_size\] = \(8, 1\)"):
        op(torch.randn(1, 64), packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="packed must be uint8"):
        op(torch.randn(1, 64), packed.to(torch.int8), scales, zeros, 32)
    with pytest.raises(cc.UnsupportedInputError, match="dtype torch.float64 is not supported"):
        op(torch.randn(1, 64, dtype=torch.float64), packed, scales, zeros, 32)
    with pytest.raises(ValueError, match=f"takes 1..{MAX_M}"):
        int4_gemv(torch.randn(MAX_M + 1, 64), packed, scales, zeros, 32)
    with pytest.raises(ValueError, match="reduce_at_end=True needs M == 1"):
        int4_gemv(torch.randn(2, 64), packed, scales, zeros, 32, reduce_at_end=True)
    with pytest.raises(ValueError, match="block_n=24 must be a power of two"):
        int4_gemv(torch.randn(1, 64), packed, scales, zeros, 32, block_n=24)
    with pytest.raises(ValueError, match="values must be integers in 0..15"):
        pack_int4(torch.full((2, 4), 16))


# ---- GPU (H200): pytest -m gpu tests/test_int4_triton.py ----------------------------------------

AYA = [(1024, 4096), (4096, 4096), (14336, 4096), (4096, 14336), (256000, 4096)]  # (N, K) of Aya-8B


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", AYA)
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_kernel_at_aya_shapes(n, k, m):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    packed, scales, zeros = quantize_int4(w, 128)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = x.double() @ dequantize_int4(packed, scales, zeros, 128).double().t()
    for split_k, reduce_at_end in ((None, None), (1, None), (4, None), (None, False)):  # False: M = 1 per-chunk form
        out = int4_gemv(x, packed, scales, zeros, 128, split_k=split_k, reduce_at_end=reduce_at_end)
        err = rel_err(out, ref)
        assert out.dtype == torch.bfloat16 and err < 8e-3, (split_k, reduce_at_end, err)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", AYA)
def test_gpu_m1_kernel_at_aya_shapes(n, k):
    g = torch.Generator(device="cuda").manual_seed(1)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    packed, scales, zeros = quantize_int4(w, 128)
    x = torch.randn(1, k, device="cuda", generator=g, dtype=torch.bfloat16)
    ref = x.double() @ dequantize_int4(packed, scales, zeros, 128).double().t()
    for knobs in ({}, {"split_k": 1}, {"split_k": 4, "prefetch": False}, {"block_n": 16, "block_k": 512},
                  {"block_n": 256, "block_k": 128, "num_warps": 8}, {"stages": 4}, {"stages": 3, "split_k": 4},
                  {"block_n": 64, "block_k": 512, "stages": 5, "num_warps": 8}, {"lean": 1}, {"lean": 2},
                  {"lean": 1, "block_n": 16, "block_k": 512}, {"lean": 2, "split_k": 4, "prefetch": False}):
        out = int4_gemv_m1(x, packed, scales, zeros, 128, **knobs)
        err = rel_err(out, ref)
        assert out.dtype == torch.bfloat16 and err < 8e-3, (knobs, err)
    assert rel_err(torch.ops.cohere.int4_linear(x, packed, scales, zeros, 128), ref) < 8e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 14336), (1024, 4096)])  # down (splits 8 ways), k/v (no split)
def test_gpu_partials_with_and_without_swiglu_at_aya_shapes(n, k):
    """The decode graph's form of the down projection: partials (fused SwiGLU or not) summed = the
    reference of swiglu(gate, up) @ W^T; and the one-pass dequantization at that shape."""
    from cohere_compile.kernels.int4_dequant import dequantize

    g = torch.Generator(device="cuda").manual_seed(2)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    packed, scales, zeros = quantize_int4(w, 128)
    gate, up = (torch.randn(1, 1, k, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    act = torch.ops.cohere.swiglu(gate, up)
    w64 = dequantize_int4(packed, scales, zeros, 128).double()
    ref = act.view(1, k).double() @ w64.t()
    fused = torch.ops.cohere.int4_linear_partials(gate, packed, scales, zeros, 128, up)
    plain = torch.ops.cohere.int4_linear_partials(act, packed, scales, zeros, 128)
    assert fused.shape == plain.shape == (m1.launch_plan(n, k, 128)["split"], n)
    assert rel_err(fused.sum(0, keepdim=True), ref) < 8e-3 and rel_err(plain.sum(0, keepdim=True), ref) < 8e-3
    assert rel_err(fused, plain) < 1e-5  # the same activation read two ways
    dense = dequantize(packed, scales, zeros, 128, torch.bfloat16)
    assert rel_err(dense, w64) < 4e-3


@pytest.mark.gpu
def test_gpu_op_large_m_and_tinygemm_agree():
    """The op's large-M path, and our layer against torchao's tinygemm layer of the same weight
    (same quantization math: outputs agree to bf16 rounding)."""
    from torchao.quantization import quantize_

    from cohere_compile.quant import int4_config

    linear = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    ours = Int4TritonLinear.from_linear(linear, 128)
    quantize_(linear, int4_config(torch.device("cuda"), torch.bfloat16, 128))
    for m in (1, 7, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ ours.dequantized_weight().double().t()
        out = ours(x)
        assert rel_err(out, ref) < 8e-3, (m, rel_err(out, ref))
        assert rel_err(out, linear(x)) < 1.5e-2, (m, rel_err(out, linear(x)))


@pytest.mark.gpu
def test_gpu_optimize_triton_int4_generate():
    """bf16: logits as the dequantized model; fp32 (no rounding noise to flip a greedy pick):
    cc.generate compiled (CUDA graphs) gives the eager path's tokens."""
    cfg = transformers.CohereConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)
    model = make_model(cfg, torch.bfloat16).cuda()
    cc.optimize(model, quantize="int4", int4_kernel="triton", group_size=128)
    ref = dequantized_reference(model, cfg, torch.bfloat16).cuda()
    ids = torch.randint(3, 1024, (1, 9), device="cuda")
    assert rel_err(logits(model, input_ids=ids), logits(ref, input_ids=ids)) < 2e-2
    model = make_model(cfg, torch.float32).cuda()
    cc.optimize(model, quantize="int4", int4_kernel="triton", group_size=128)
    prompts = [[5, 9, 33, 7, 100], [11, 3, 60]]
    tokens = cc.generate(model, prompts, 16, stop_tokens=())
    assert tokens == cc.generate(model, prompts, 16, stop_tokens=(), compiled=False)
