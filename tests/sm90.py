"""Compile Triton kernels for sm_90 without a GPU, for the tests that read what the H200 would run.

Triton compiles for any target it knows, and its wheel bundles ptxas and nvdisasm. The test
process runs with ``TRITON_INTERPRET=1``, where ``@triton.jit`` gives interpreter functions, so
the compile runs in a subprocess with the interpreter off. Each spec names a kernel
(``"module.attr"``), its signature (Triton type strings), its constexprs, the compile options
and which arguments to treat as divisible by 16 (what the launcher's specialization gives at
Aya-8B shapes). Each result holds the PTX, ``ptxas -v``'s report and return code, and the SASS.
"""

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
results = []
for spec in json.loads(sys.stdin.read()):
    module, name = spec["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    sig = {**spec["signature"], **{k: "constexpr" for k in spec["constexprs"]}}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec["divisible"]}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in spec["constexprs"].items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    info = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                          capture_output=True, text=True)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    sass = subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    results.append({"ptx": kernel.asm["ptx"], "ptxas": info.stderr + info.stdout, "rc": info.returncode,
                    "sass": sass})
print(json.dumps(results))
"""


def spec(kernel: str, signature: dict, constexprs: dict, options: dict, divisible=()) -> dict:
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "options": options,
            "divisible": list(divisible)}


def compile_sm90(specs: list[dict]) -> list[dict]:
    """Compile every spec in one subprocess; returns their results in order."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(specs), capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
