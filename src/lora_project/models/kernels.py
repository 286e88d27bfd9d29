"""Which fp32 matmul kernel the inference passes use on CPU: PyTorch's default (MKL) or oneDNN's.

Both are fp32 arithmetic: fp32 inputs, products, accumulation and output. They differ only in the
order of the additions, so their results differ at the level of fp32 rounding (relative 1e-7 per
matmul), as two BLAS libraries or two thread counts do. Their speed can differ a lot: on AMD Zen 5
(AVX-512), PyTorch's default CPU matmul runs at 60-170 GFLOP/s on the default model's shapes and
oneDNN's AVX-512 kernel (`torch.ops.mkldnn._linear_pointwise`, the one PyTorch's compiler uses) at
100-390, 2-3.4x (research notes, "An fp32 kernel at the machine's peak").

Restricted to AVX2 on the same CPU, both run at 170-210 GFLOP/s (oneDNN 1.0-1.7x the default, the
output layer gaining most), so `auto` (the default) takes oneDNN wherever this PyTorch build has it
and its result on a small matmul agrees with the default kernel's: a fixed rule rather than a
timing, so a machine always gets the same kernel and the same numbers. The environment variable
`LORA_PROJECT_FP32_KERNEL=native` keeps PyTorch's default. Only inference uses it (`fp32_linears`,
`linear`): anything that needs a gradient, runs under autocast or is not fp32 on CPU takes the
layer's own forward, so training's gradients and updates are unchanged. (Validation during an fp32
training run is inference: its token NLLs move by fp32 rounding, about 1e-6 nats.)
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from lora_project.errors import UserError

FP32_KERNELS = ("native", "onednn")
ENV = "LORA_PROJECT_FP32_KERNEL"
_CHOSEN: dict[str, str] = {}
_FORCED: list[str] = []  # forced_kernel's stack: the benchmark compares both kernels in one process


def onednn_available() -> bool:
    """True when this PyTorch build has oneDNN's fp32 linear kernel on CPU."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn(x, weight, bias=None):
    import torch

    # oneDNN misreads a strided bias (a slice or an expanded view): give it a dense one
    bias = bias.contiguous() if bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _agrees() -> bool:
    """oneDNN's result on a small random matmul equals the default kernel's to fp32 rounding."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((33, 576), (200, 576), (200,)))
    try:
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):  # may be asked inside a bf16 pass
            return bool(torch.allclose(_onednn(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4))
    except RuntimeError:  # present in the build but not runnable on this CPU: the default kernel
        return False


def requested_kernel() -> str:
    """The environment's choice (auto, native or onednn), checked: a bad value is a UserError. Cheap:
    the CLI checks it before any work, so a typo never surfaces halfway through a training."""
    raw = os.environ.get(ENV, "auto")
    wanted = raw.strip().lower() or "auto"  # case and surrounding spaces do not matter; empty is auto
    if wanted not in (*FP32_KERNELS, "auto"):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise UserError(f"{ENV}={shown!r}: choose auto, {', '.join(FP32_KERNELS)}")
    return wanted


def fp32_kernel() -> str:
    """The fp32 kernel of this process: `native` or `onednn` (module docstring). Bad values of the
    environment variable are a UserError. Inside `forced_kernel(name)`, that kernel."""
    if _FORCED:
        return _FORCED[-1]
    wanted = requested_kernel()
    if wanted not in _CHOSEN:
        usable = wanted != "native" and onednn_available() and _agrees()
        if wanted == "onednn" and not usable:
            raise UserError(f"{ENV}=onednn, but this PyTorch build has no working oneDNN fp32 linear kernel; "
                            "use auto or native")
        _CHOSEN[wanted] = "onednn" if usable else "native"
    return _CHOSEN[wanted]


@contextmanager
def forced_kernel(name: str):
    """Inside, `fp32_kernel()` is `name` whatever the environment says (for side-by-side measurements)."""
    if name not in FP32_KERNELS:
        raise ValueError(f"unknown fp32 kernel {name!r}; choose one of {', '.join(FP32_KERNELS)}")
    if name == "onednn" and not onednn_available():
        raise UserError("this PyTorch build has no oneDNN fp32 linear kernel")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _plain_fp32(x, weight) -> bool:
    import torch

    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x, weight, bias=None):
    """x @ weight.T (+ bias) with this process's fp32 kernel where it applies (fp32 on CPU, no
    gradient, no autocast); otherwise torch.nn.functional.linear."""
    import torch

    if _plain_fp32(x, weight) and fp32_kernel() == "onednn":  # other passes never ask for the kernel
        return _onednn(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _forward(module):
    plain = type(module).forward

    def forward(x):
        if _plain_fp32(x, module.weight):
            return _onednn(x, module.weight, module.bias)
        return plain(module, x)
    return forward


@contextmanager
def fp32_linears(model, device: str = "cpu"):
    """Inside, every `torch.nn.Linear` of `model` without a forward of its own runs on oneDNN's fp32
    kernel when that is this process's kernel (and falls back to its own forward for gradients,
    autocast or other dtypes); restored after. Yields the kernel in use."""
    import torch

    if device != "cpu" or fp32_kernel() != "onednn":
        yield "native"
        return
    swapped = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__]
    try:
        for module in swapped:
            module.forward = _forward(module)
        yield "onednn"
    finally:
        for module in swapped:
            module.__dict__.pop("forward", None)
