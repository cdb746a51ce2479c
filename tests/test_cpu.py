"""MKL's fast path on AMD CPUs (llmmo.cpu): applied where it can be, refused when asked, and the products it
gives agree with float64 as MKL's generic path does; and glibc's malloc keeping freed memory. Each case runs in a
fresh process: MKL keeps the vendor it sees first, and malloc's settings are the process's."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmmo.cpu import cpu_vendor

AMD_WITH_MKL = (
    sys.platform == "linux"
    and platform.machine() == "x86_64"
    and cpu_vendor() == "AuthenticAMD"
    and torch.backends.mkl.is_available()
)

# products as the model computes them: a large square, F.linear with a bias, and causal attention's forward
PRODUCTS = """
import ctypes, os, sys
import torch
import torch.nn.functional as F
if sys.argv[3] == "late":
    torch.randn(8, 8) @ torch.randn(8, 8)  # a product before llmmo: MKL has picked its path
import llmmo.model  # applies the fast path, before any product
from llmmo.cpu import mkl_fast_path
from llmmo.config import TrainConfig
from llmmo.train.trainer import uses_onednn
from safetensors.torch import save_file

g = torch.Generator().manual_seed(0)
a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
x, w, bias = torch.randn(300, 384, generator=g), torch.randn(1152, 384, generator=g), torch.randn(1152, generator=g)
q, k, v = (torch.randn(2, 3, 256, 64, generator=g) for _ in range(3))
save_file({"mm": a @ b, "linear": F.linear(x, w, bias),
           "attention": F.scaled_dot_product_attention(q, k, v, is_causal=True)}, sys.argv[1])
a64, b64, x64, w64 = a.double(), b.double(), x.double(), w.double()
q64, k64, v64 = q.double(), k.double(), v.double()
save_file({"mm": a64 @ b64, "linear": F.linear(x64, w64, bias.double()),
           "attention": F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)}, sys.argv[2])
cpu_type = -1  # MKL's kernel family as its dispatcher sees it: 0 generic, > 0 Intel's (-1: no MKL here)
if torch.backends.mkl.is_available():
    cpu_type = ctypes.CDLL("libtorch_cpu.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY).mkl_serv_get_cpu_type(0)
onednn = uses_onednn(TrainConfig(matmul="auto"), torch.device("cpu"), bf16=False)
print(mkl_fast_path(), mkl_fast_path(), cpu_type, onednn)
"""


def products(tmp_path: Path, name: str, env: dict[str, str], when: str = "first") -> tuple[dict, dict, dict]:
    """Run PRODUCTS in a fresh process (the fast path asked for `first`, or `late`: after a product): what it
    reported, its fp32 results, the float64 ones."""
    out, ref = tmp_path / f"{name}.safetensors", tmp_path / f"{name}-64.safetensors"
    proc = subprocess.run([sys.executable, "-c", PRODUCTS, str(out), str(ref), when], capture_output=True,
                          text=True, env=os.environ | env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second, cpu_type, onednn = proc.stdout.split()
    assert first == second, "mkl_fast_path answered differently when asked twice"
    report = {"fast": first == "True", "cpu_type": int(cpu_type), "onednn": onednn == "True"}
    return report, load_file(out), load_file(ref)


def test_fast_path_applies_on_amd_and_is_refused_when_asked(tmp_path):
    fast, results, reference = products(tmp_path, "fast", {"LLMMO_MKL_ON_AMD": "1"})
    assert fast["fast"] is AMD_WITH_MKL, "the fast path applies exactly on Linux x86-64 AMD CPUs with MKL"
    generic, generic_results, _ = products(tmp_path, "generic", {"LLMMO_MKL_ON_AMD": "0"})
    assert generic["fast"] is False, "LLMMO_MKL_ON_AMD=0 must leave MKL as it is"
    for name, want in reference.items():  # both paths: fp32 products to fp32 rounding of a 1024-term sum
        scale = want.abs().max()
        for got in (results[name], generic_results[name]):
            assert (got.double() - want).abs().max() <= 1e-5 * scale, name
    if AMD_WITH_MKL:
        assert fast["cpu_type"] > 0 and generic["cpu_type"] == 0, "MKL's dispatcher must see the kernels chosen"
        # other kernels sum in another order: the last bits differ
        assert not torch.equal(results["mm"], generic_results["mm"]), "the fast path did not change MKL's kernels"
        # train.matmul=auto: oneDNN's products exactly where MKL stays generic (docs/LOG.md)
        assert fast["onednn"] is False and generic["onednn"] is True


@pytest.mark.skipif(not AMD_WITH_MKL, reason="the fast path applies on Linux x86-64 AMD CPUs with MKL only")
def test_fast_path_asked_after_a_product_says_no(tmp_path):
    """MKL keeps the path of its first product: asked later, the fast path must answer False (and the trainer
    then takes oneDNN's products), not claim a speed MKL does not have."""
    late, _, _ = products(tmp_path, "late", {"LLMMO_MKL_ON_AMD": "1"}, when="late")
    assert late == {"fast": False, "cpu_type": 0, "onednn": True}


# training steps of the 0.8M shape (random tokens): minor page faults per step, before and after keep_freed_memory
STEPS = """
import resource
import torch
from llmmo.config import ModelConfig, resolve_model
from llmmo.cpu import keep_freed_memory
from llmmo.model import Transformer

torch.manual_seed(0)
model = Transformer(resolve_model(ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=65, block_size=64)))
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
x, y = torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))

def step():
    model(x, y)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

def faults_per_step(steps=20):
    for _ in range(5):  # warm-up: the heap grows to what a step needs
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

default = faults_per_step()
print(keep_freed_memory(), default, faults_per_step())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc and its mallopt are Linux's")
def test_kept_freed_memory_spares_a_training_step_its_page_faults() -> None:
    proc = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept, default, with_keep = proc.stdout.split()
    if float(default) < 100:
        pytest.skip(f"this C library faults {default} pages a step already (jemalloc or tcmalloc preloaded?)")
    assert kept == "True" and float(with_keep) < float(default) / 5, (default, with_keep)  # measured: >= 15x fewer
