"""The CPU under PyTorch: its vendor, whether it computes bf16, MKL's fast kernels on AMD CPUs, and glibc's
malloc keeping freed memory for the next training step.

PyTorch's fp32 products on an x86-64 CPU (`a @ b`, `F.linear`, the blocks of SDPA's CPU flash attention) are
MKL's sgemm. MKL chooses its kernels by the CPU's vendor before its instruction sets: on a CPU that is not
"GenuineIntel" it runs a generic path whatever the CPU supports. On this project's AMD EPYC machines (AVX-512)
that path runs a 2048 x 2048 product at ~215 GFLOP/s, and MKL's own AVX-512 kernels at ~500; attention's forward
and backward (batch 16, 6 heads, context 256) take 19 instead of 34 ms (docs/LOG.md).

MKL's dispatcher asks an exported function, `mkl_serv_intel_cpu_true`, whether the CPU is Intel's, and keeps
the kernels it picks at its first product. `mkl_fast_path()` rewrites that function in this process, before MKL
first asks, to answer yes: the runtime form of the well-known LD_PRELOAD work-around, which needs neither a
compiler nor a restart. MKL then picks its kernels from the CPU's instruction sets (cpuid), as it does on an Intel
CPU with the same sets (other parts of MKL with their own vendor test are unchanged); results agree with the
generic path to fp32 rounding (tests/test_cpu.py). It applies only on Linux x86-64 with an AMD CPU and MKL inside
torch, before the process's first product; LLMMO_MKL_ON_AMD=0 in the environment leaves MKL as it is.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
import threading
import warnings

import torch

_RETURN_ONE = b"\xb8\x01\x00\x00\x00\xc3"  # x86-64: mov eax, 1; ret
# how the function starts in the MKL builds it was measured with: mov eax, [rip + cached answer]. Another start
# means another MKL, whose function may be shorter than the 6 bytes written: then it is left alone.
_EXPECTED_START = b"\x8b\x05"
_state: bool | None = None  # mkl_fast_path's answer, once asked
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_BLOCKS_UP_TO = 32 << 20  # bytes; the ceiling of glibc's own dynamic mmap threshold on 64-bit systems
_lock = threading.Lock()


def cpu_vendor() -> str:
    """The CPU's vendor id on Linux ("AuthenticAMD", "GenuineIntel"); "" where /proc/cpuinfo does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def fast_bf16() -> bool:
    """Whether this CPU computes bf16 products in hardware (AVX512-BF16 or AMX), so that bf16 weights halve the
    bytes a decoding step reads at no loss of speed; without them bf16 runs ~100x slower than fp32. Asked of
    torch's own CPU probe (any OS)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def mkl_fast_path() -> bool:
    """Let MKL take the kernels of this CPU's instruction sets on an AMD CPU (see the module's text); returns
    whether MKL's dispatcher now sees them. Call it before the process's first product: MKL keeps what it picked
    first, so later it answers False and changes nothing. Idempotent and thread-safe; never raises (where the
    work-around cannot apply, MKL stays as it is)."""
    global _state
    with _lock:
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
        lib = ctypes.CDLL("libtorch_cpu.so", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        cpu_type, detect = lib.mkl_serv_get_cpu_type, lib.mkl_serv_cpu_detect
        address = ctypes.cast(lib.mkl_serv_intel_cpu_true, ctypes.c_void_p).value
    except (OSError, AttributeError):  # another torch layout, or an MKL without these functions
        return False
    cpu_type.argtypes, cpu_type.restype, detect.restype = (ctypes.c_int,), ctypes.c_int, ctypes.c_int
    if cpu_type(0) != -1:  # MKL has run already and keeps the path it picked
        return False
    if ctypes.string_at(address, len(_EXPECTED_START)) != _EXPECTED_START:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = address & ~(mmap.PAGESIZE - 1)
    size = address + len(_RETURN_ONE) - page  # one page, or two if the bytes cross a page's end
    # the code stays executable throughout (another thread may run code on the same page); a system that
    # refuses writable code (W^X) refuses here, and MKL stays as it is
    if libc.mprotect(page, size, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC) != 0:
        return False
    ctypes.memmove(address, _RETURN_ONE, len(_RETURN_ONE))
    if libc.mprotect(page, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        error = os.strerror(ctypes.get_errno())
        warnings.warn(f"llmmo.cpu: MKL's code page stays writable ({error})", RuntimeWarning, stacklevel=3)
    # what MKL's dispatcher sees now, through the same symbol lookup as MKL (a copy of the function loaded
    # earlier by another library would win over the one rewritten here): > 0 is an Intel kernel family
    return detect() > 0


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS; returns whether it
    now does. A CPU training step allocates and frees the same tensors every step. glibc serves blocks above its
    (dynamic) mmap threshold with mmap and unmaps them when freed, and trims the heap's free top, so the next step
    faults every page in again: 500-1,000 page faults a step at the 0.8M shape, ~30,000 at 10.7M. With blocks up
    to 32 MiB served from the heap and no trimming: 3-5 and ~190, and the 0.8M step is 1-9% faster (10.7M: 1.5%;
    docs/LOG.md). This is what preloading jemalloc or tcmalloc does for PyTorch on CPUs, in-process. The resident
    memory then stays at its high-water mark, which a training loop reaches every step anyway. Process-wide;
    Linux with glibc only (elsewhere it answers False and changes nothing)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library: glibc's, or musl's (which ignores it)
    except (OSError, AttributeError):  # no dynamic loading, or no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    served = mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_UP_TO)  # both asked, whichever one a C library refuses
    kept = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(served) and bool(kept)
