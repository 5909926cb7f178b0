"""Programmatic Dependent Launch for our decode kernels (kernels/pdl.py).

CPU: when PDL is asked for and when not; every decode kernel waits first (its source, and the
sm_90 PTX Triton compiles here: ``griddepcontrol.wait`` before any global load or store); every
decode launcher asks for it; cc.generate turns it on around its decode step only.
GPU: a chain of decode kernels, each reading the one before's output at once, replayed in a CUDA
graph with PDL, equals the same chain without.
"""

import ast
import importlib
import inspect
import textwrap

import pytest
import torch

import cohere_compile as cc
from cohere_compile.kernels import int4_gemv, int4_gemv_m1, layer_norm, paged, pdl, rope, swiglu
from cohere_compile.quant.int4_triton import quantize_int4
from conftest import tiny_config

generate_mod = importlib.import_module("cohere_compile.generate")  # the module (cc.generate is the function)

# every kernel cc.generate's decode step can launch
DECODE_KERNELS = [layer_norm.layer_norm_kernel, swiglu.swiglu_kernel, paged.paged_kv_write_kernel,
                  paged.paged_decode_kernel, paged.paged_merge_kernel, rope.qk_norm_rope_kernel,
                  int4_gemv.int4_gemv_kernel, int4_gemv_m1.int4_gemv_m1_kernel]


def test_pdl_is_off_unless_asked_and_supported(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert pdl.launch_options(cpu) == {"PDL": False, "launch_pdl": False}
    with pdl.launches(True):
        assert pdl.requested()
        assert pdl.launch_options(cpu) == {"PDL": False, "launch_pdl": False}  # no griddepcontrol on CPU
    assert not pdl.supported(cpu)
    monkeypatch.setattr(pdl, "supported", lambda device: device.type == "cuda")
    assert pdl.launch_options(gpu) == {"PDL": False, "launch_pdl": False}  # not asked for
    with pdl.launches(True):
        assert pdl.launch_options(gpu) == {"PDL": True, "launch_pdl": True}
        with pdl.launches(False):
            assert pdl.launch_options(gpu)["PDL"] is False
        assert pdl.launch_options(gpu)["PDL"] is True  # the inner block restored the outer setting
    assert not pdl.requested()


def test_pdl_needs_compiled_triton_on_hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.supported(torch.device("cuda", 0))  # the interpreter has no griddepcontrol
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pdl.supported(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not pdl.supported(torch.device("cuda", 0))  # A100: no PDL


def _body(kernel) -> list[ast.stmt]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
    body = tree.body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # docstring
        body = body[1:]
    return body


# kernels that read constant inputs (the model's weights) before the wait, and the arguments that
# must not be touched before it (the previous kernel's output, our own output)
CONSTANTS_BEFORE_WAIT = {"int4_gemv_m1_kernel": {"x_ptr", "out_ptr"}}


@pytest.mark.parametrize("kernel", DECODE_KERNELS, ids=lambda k: k.fn.__name__)
def test_every_decode_kernel_waits_before_anything_else(kernel):
    """The wait is the first statement, or (the int4 GEMV) comes before any use of x or the
    output: what runs before it only reads the weights."""
    name = kernel.fn.__name__
    assert "PDL" in inspect.signature(kernel.fn).parameters
    body = _body(kernel)
    waits = [i for i, stmt in enumerate(body) if ast.unparse(stmt) == "wait_then_release(PDL)"]
    assert len(waits) == 1, name
    if name not in CONSTANTS_BEFORE_WAIT:
        assert waits[0] == 0, ast.unparse(body[0])
        return
    before = {n.id for stmt in body[:waits[0]] for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    assert not before & CONSTANTS_BEFORE_WAIT[name], before & CONSTANTS_BEFORE_WAIT[name]
    assert "_load_weights" in before  # and the point of it: the first weights are read before the wait


def _int4(n, k, group=32):
    g = torch.Generator().manual_seed(0)
    return quantize_int4(torch.randn(n, k, generator=g) * 0.05, group)


def _launch_each_decode_kernel():
    """Every decode launcher once, on tiny CPU inputs (the interpreter runs them)."""
    x = torch.randn(3, 40)
    layer_norm.layer_norm(x, torch.ones(40), 1e-5)
    layer_norm.add3_layer_norm(x, x, x, torch.ones(40), 1e-5)
    swiglu.swiglu(x, x)
    b, h, hkv, d, bs = 2, 4, 2, 16, 16
    k_pool, v_pool = torch.zeros(6, hkv, bs, d), torch.zeros(6, hkv, bs, d)
    k = torch.randn(b, hkv, 1, d)
    slots = torch.tensor([[3], [20]])
    paged.paged_kv_write(k_pool, v_pool, k, k, slots)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([4, 21], dtype=torch.int32)
    q = torch.randn(b, h, 1, d)
    paged.paged_decode_attention(q, k_pool, v_pool, table, lens, None, d ** -0.5, torch.empty_like(q))
    cos, sin = torch.randn(2, 1, 1, d)
    rope.qk_norm_rope(q, k, None, None, cos, sin, 1e-5)
    rope.qk_norm_rope_kv_write(q, k, k, None, None, cos, sin, 1e-5, k_pool, v_pool, slots)
    packed, scales, zeros = _int4(24, 64)
    int4_gemv.int4_gemv(torch.randn(2, 64), packed, scales, zeros, 32)
    int4_gemv_m1.int4_gemv_m1(torch.randn(1, 64), packed, scales, zeros, 32)


def test_every_decode_launcher_asks_for_pdl(monkeypatch):
    """Each launch asks ``pdl.supported`` (through ``launch_options``) while PDL is requested:
    10 launches (paged attention is two kernels) from 9 launchers."""
    asked = []
    monkeypatch.setattr(pdl, "supported", lambda device: asked.append(device.type) or False)
    with pdl.launches(True):
        _launch_each_decode_kernel()
    assert asked == ["cpu"] * 10


def _sm90_ptx() -> dict:
    """Layer norm (with the fused adds) and SwiGLU compiled for sm_90, keyed (name, PDL on)."""
    from sm90 import compile_sm90, spec

    specs = {}
    for pdl_on in (True, False):
        specs["layer_norm", pdl_on] = spec(
            "cohere_compile.kernels.layer_norm.layer_norm_kernel",
            {"x_ptr": "*bf16", "a_ptr": "*bf16", "m_ptr": "*bf16", "w_ptr": "*bf16", "sum_ptr": "*bf16",
             "out_ptr": "*bf16", "n_cols": "i32", "eps": "fp32"},
            {"HAS_ADDS": True, "BLOCK": 4096, "PDL": pdl_on}, {"num_warps": 4})
        specs["swiglu", pdl_on] = spec("cohere_compile.kernels.swiglu.swiglu_kernel",
                                       {"g_ptr": "*bf16", "u_ptr": "*bf16", "o_ptr": "*bf16", "n": "i32"},
                                       {"BLOCK": 1024, "PDL": pdl_on}, {"num_warps": 4})
    return {key: r["ptx"] for key, r in zip(specs, compile_sm90(list(specs.values())))}


def test_sm90_ptx_waits_before_the_first_global_access():
    """The wait must come before every load and store in the compiled code, not only in the
    source: Triton may not hoist a load above it. Without PDL there is no griddepcontrol."""
    compiled = _sm90_ptx()
    for (name, pdl_on), ptx in compiled.items():
        if not pdl_on:
            assert "griddepcontrol" not in ptx, name
            continue
        lines = ptx.splitlines()
        wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
        release = next(i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line)
        first_access = next(i for i, line in enumerate(lines) if "ld.global" in line or "st.global" in line)
        assert wait < release < first_access, (name, wait, release, first_access)
    assert len(compiled) == 4


def test_generate_launches_the_decode_step_with_pdl_only(monkeypatch, ops_torch_path):
    """``_launching_with_pdl`` requests PDL inside the decode call and nowhere else; on CPU
    cc.generate does not wrap the step (there is nothing to launch with PDL)."""
    seen = []
    wrapped = generate_mod._launching_with_pdl(lambda *a, **k: seen.append((a, k, pdl.requested())) or "out")
    assert wrapped(1, x=2) == "out" and seen == [((1,), {"x": 2}, True)]
    assert not pdl.requested()

    model = cc.optimize(__import__("transformers").CohereForCausalLM(tiny_config(False, 2)).eval())
    calls = []
    real = generate_mod._launching_with_pdl
    monkeypatch.setattr(generate_mod, "_launching_with_pdl", lambda fn: calls.append(fn) or real(fn))
    cc.generate(model, [[5, 6, 7]], 2, stop_tokens=())
    assert calls == []  # CPU: no PDL wrapper, even though PDL is requested by default on CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_kernel_chain_with_pdl_equals_without():
    """60 kernels, each consuming the previous one's output as soon as it starts (norm -> int4
    GEMV -> SwiGLU -> int4 GEMV -> fused add + norm ...), captured in one CUDA graph with PDL:
    if a kernel read before its wait it would see stale data and differ. Replayed 20 times."""
    if not pdl.supported(torch.device("cuda")):
        pytest.skip("PDL needs compute capability >= 9.0")
    dev, h, inter = "cuda", 4096, 14336
    g = torch.Generator(device="cpu").manual_seed(0)
    up = quantize_int4((torch.randn(2 * inter, h, generator=g) * 0.02).to(dev, torch.bfloat16), 128)
    down = quantize_int4((torch.randn(h, inter, generator=g) * 0.02).to(dev, torch.bfloat16), 128)
    w = torch.ones(h, device=dev, dtype=torch.bfloat16)
    x0 = torch.randn(1, h, device=dev, dtype=torch.bfloat16)

    def chain():
        x = x0
        res = x0
        for _ in range(12):
            n = layer_norm.layer_norm(x, w, 1e-5)
            gu = int4_gemv_m1.int4_gemv_m1(n, *up, 128)
            act = swiglu.swiglu(gu[:, :inter], gu[:, inter:])
            y = int4_gemv_m1.int4_gemv_m1(act, *down, 128)
            res, x = layer_norm.add3_layer_norm(res, y, y, w, 1e-5)
        return x

    expected = chain()
    with pdl.launches(True):
        assert pdl.launch_options(x0.device)["PDL"]
        chain()  # compile the PDL variants outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
    for _ in range(20):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
