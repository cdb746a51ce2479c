"""The CPU under PyTorch: its vendor, and MKL's fast kernels on AMD CPUs.

PyTorch's fp32 products on an x86-64 CPU (`a @ b`, `F.linear`, the blocks of SDPA's CPU flash attention) are
MKL's sgemm. MKL chooses its kernels by the CPU's vendor before its instruction sets: on a CPU that is not
"GenuineIntel" it runs a generic path whatever the CPU supports. On this project's AMD EPYC machines (AVX-512)
that path runs a 2048 x 2048 product at ~215 GFLOP/s, and MKL's own AVX-512 kernels at ~500; attention's forward
and backward (batch 16, 6 heads, context 256) take 19 instead of 34 ms (docs/LOG.md).

MKL asks one exported function, `mkl_serv_intel_cpu_true`, whether the CPU is Intel's, and keeps the first
answer. `mkl_fast_path()` rewrites that function in this process, before MKL first asks, to answer yes: the
runtime form of the well-known LD_PRELOAD work-around, which needs neither a compiler nor a restart. MKL then
picks its kernels from the CPU's instruction sets (cpuid), as on an Intel CPU of the same sets; results agree
with the generic path to fp32 rounding (tests/test_cpu.py). It applies only on Linux x86-64 with an AMD CPU and
MKL inside torch; LLMMO_MKL_ON_AMD=0 in the environment leaves MKL as it is.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys

import torch

_RETURN_ONE = b"\xb8\x01\x00\x00\x00\xc3"  # x86-64: mov eax, 1; ret
_state: bool | None = None  # mkl_fast_path's answer, once asked


def cpu_vendor() -> str:
    """The CPU's vendor id on Linux ("AuthenticAMD", "GenuineIntel"); "" where /proc/cpuinfo does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def mkl_fast_path() -> bool:
    """Let MKL take the kernels of this CPU's instruction sets on an AMD CPU (see the module's text); returns
    whether it does. Call it before the process's first product: MKL keeps the vendor it saw first, so a later
    call changes nothing. Idempotent; never raises (where the work-around cannot apply, MKL stays as it is)."""
    global _state
    if _state is None:
        _state = _answer_intel()
    return _state


def _answer_intel() -> bool:
    if os.environ.get("LLMMO_MKL_ON_AMD", "1") == "0":
        return False
    if sys.platform != "linux" or platform.machine() != "x86_64" or cpu_vendor() != "AuthenticAMD":
        return False
    if not torch.backends.mkl.is_available():
        return False
    try:  # the library is loaded already (torch is imported); RTLD_NOLOAD only looks it up
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                          mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # fmt: skip
        address = ctypes.cast(lib.mkl_serv_intel_cpu_true, ctypes.c_void_p).value
    except (OSError, AttributeError):  # another torch layout, or an MKL without the symbol
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = address & ~(mmap.PAGESIZE - 1)
    size = address + len(_RETURN_ONE) - page
    # the code stays executable throughout (another thread may run code on the same page); a system that
    # refuses writable code (W^X) refuses here, and MKL stays as it is
    if libc.mprotect(page, size, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC) != 0:
        return False
    ctypes.memmove(address, _RETURN_ONE, len(_RETURN_ONE))
    libc.mprotect(page, size, mmap.PROT_READ | mmap.PROT_EXEC)
    return True
