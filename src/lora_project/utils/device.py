"""Device, precision and thread choices, resolved once per run."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lora_project.errors import UserError


def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # older torch or a non-x86 build
        try:
            with open("/proc/cpuinfo") as fh:
                flags = fh.read()
            return "avx512_bf16" in flags or "amx_bf16" in flags
        except OSError:
            return False


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads do not help matmuls)."""
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        siblings = [int(line.split(":")[1]) for line in text.splitlines() if line.startswith("siblings")]
        cores = [int(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu cores")]
        if siblings and cores and siblings[0] > cores[0]:
            return max(1, avail * cores[0] // siblings[0])
    except (OSError, ValueError, IndexError):
        pass
    return max(1, avail)


@dataclass(frozen=True)
class Runtime:
    """Device, precision, threads of a run, and the matching autocast context."""
    device: str      # cpu | cuda
    precision: str   # fp32 | bf16
    threads: int

    @property
    def autocast_dtype(self):
        import torch

        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.precision == "bf16")


_MALLOC_TUNED = False


def reuse_freed_memory() -> bool:
    """Keep freed memory in this process for reuse instead of handing it back to the OS (glibc only).

    By default glibc serves every allocation above a threshold (at most 32 MB) with a fresh mmap
    and unmaps it when freed, so each large tensor (a chunk of logits, an activation) costs a page
    fault per 4 KiB page on first touch, every step. Raising the mmap and trim thresholds makes
    those blocks come from, and return to, the heap. Process-wide and idempotent; returns whether
    it is in effect (False on non-glibc systems).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _MALLOC_TUNED = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    return _MALLOC_TUNED


def resolve_runtime(device: str = "auto", precision: str = "auto", threads: int = 0,
                    malloc_reuse: bool = True) -> Runtime:
    """Turn the config's device/precision/threads (auto allowed) into a Runtime; on CPU with
    `malloc_reuse`, also keep freed memory for reuse (`reuse_freed_memory`)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("training.device is 'cuda' but no CUDA device is available")
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    n = threads or physical_cores()
    if device == "cpu":
        torch.set_num_threads(n)
        if malloc_reuse:
            reuse_freed_memory()
    return Runtime(device, precision, n)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_class() -> dict:
    """The CPU's model name and its widest matmul instruction class (AMX, AVX512-BF16, AVX-512, AVX2, other)."""
    name, flags = platform_name(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and name == platform_name():
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                                          ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "other")
    return {"model": name, "isa": isa, "native_bf16": cpu_has_native_bf16()}


def cpu_label(cpu: dict) -> str:
    """`cpu_class()`'s record as the reports print it: 'MODEL (ISA, native bf16: yes|no)'."""
    return f"{cpu['model']} ({cpu['isa']}, native bf16: {'yes' if cpu['native_bf16'] else 'no'})"


def platform_name() -> str:
    import platform

    return platform.processor() or platform.machine()
