"""Training memory lever (`training.lean_activations`): RMSNorm and SwiGLU that keep less for backward.

Autograd keeps, per decoder layer of a Llama-family model:

- RMSNorm (``w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)``): the fp32 copy of its input
  (a new tensor on a bf16 base) and the per-row rsqrt. The lean norm keeps the input as it came
  (no fp32 copy) and the per-row rstd (tokens x 1), and recomputes the rest in backward. On an
  fp32 base the two keep the same (the input is the fp32 tensor); there the gain is the MLP's.
- the MLP product ``silu(gate) * up``: silu keeps gate, the product keeps silu(gate) and up. The
  lean product keeps gate and up only and recomputes silu(gate) in backward (one tensor of
  tokens x intermediate less per layer).

Forward values are bit-identical to transformers' code (the same operations in the same order);
gradients equal autograd's up to float rounding (the product's are bit-identical: the same kernels).
`apply_lean_activations` patches only modules it has checked: norms of an allowlist of classes
whose forward is Llama's (read in transformers' sources; Gemma's ``1 + weight`` norms are not on
it), MLPs with gate_proj/up_proj/down_proj and a SiLU activation; each class is first run on a
small random input against its own forward, and left alone on any difference.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F

# Norm classes whose forward is LlamaRMSNorm's, line for line (transformers 5 sources:
# input_dtype = x.dtype; x = x.to(float32); variance = x.pow(2).mean(-1, keepdim=True);
# x = x * rsqrt(variance + eps); return weight * x.to(input_dtype)). Not Olmo2RMSNorm (casts after
# the weight), not Gemma's (x * (1 + weight) in fp32).
RMS_NORM_CLASSES = frozenset({
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm", "OlmoeRMSNorm",
})
_MARK = "_lora_project_lean"


class LeanRMSNorm(torch.autograd.Function):
    """``weight * (x32 * rstd).to(x.dtype)`` with rstd = rsqrt(mean(x32^2) + eps); keeps x and rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        dtype = x.dtype
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(dtype)
        out = normed.mul_(weight) if torch.result_type(weight, normed) == dtype else weight * normed
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        dtype = x.dtype
        xf = x.to(torch.float32)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * (xf * rstd).to(dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # autograd's path: d(normed) = (grad * w) in x's dtype, then fp32 from there on
            gn = (grad * weight).to(dtype).to(torch.float32)
            dot = (gn * xf).sum(-1, keepdim=True)
            coef = dot.mul_(rstd.pow(3)).div_(x.shape[-1])
            grad_x = gn.mul_(rstd).addcmul_(xf, coef, value=-1).to(dtype)
        return grad_x, grad_w, None


class LeanSiluMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up (not silu(gate)); backward uses autograd's kernels."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        act = F.silu(gate)
        return act.mul_(up) if torch.result_type(act, up) == act.dtype else act * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = (grad * F.silu(gate)).to(up.dtype)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward((grad * up).to(gate.dtype), gate)
        return grad_gate, grad_up


def rms_norm(x, weight, eps: float):
    """LlamaRMSNorm's computation; the lean autograd function when a gradient is needed."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LeanRMSNorm.apply(x, weight, eps)
    dtype = x.dtype
    xf = x.to(torch.float32)
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def silu_mul(gate, up):
    """silu(gate) * up; the lean autograd function when a gradient is needed."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad) and gate.shape == up.shape:
        return LeanSiluMul.apply(gate, up)
    return F.silu(gate) * up


def _norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _one_argument_forward(module) -> bool:
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _candidate(module):
    """The lean forward for this module, or None where it is not one we know."""
    if "forward" in vars(module):  # already patched (by us or by someone else): leave it
        return None
    name = type(module).__name__
    if name in RMS_NORM_CLASSES:
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None),
                                                                         float) and _one_argument_forward(module):
            return _norm_forward
        return None
    if (all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(module, "act_fn", None)) and _one_argument_forward(module)
            and isinstance(getattr(module.gate_proj, "in_features", None), int)):
        return _mlp_forward
    return None


def _agrees(module, lean) -> bool:
    """Whether `lean` gives the class's own forward value and input gradient on a small random input
    (in eval mode, so no dropout mask is drawn; a private generator, so no global RNG is consumed)."""
    width = module.weight.shape[-1] if lean is _norm_forward else module.gate_proj.in_features
    param = next(module.parameters())
    modes = [(m, m.training) for m in module.modules()]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=gen).to(param.device, param.dtype)
    try:
        module.eval()
        with torch.enable_grad():
            results = []
            for fn in (type(module).forward, lean):
                xi = x.clone().requires_grad_(True)
                out = fn(module, xi)
                gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
                (gx,) = torch.autograd.grad(out, [xi], gy)
                results.append((out.detach(), gx))
    except Exception:  # noqa: BLE001 - any failure means "not the computation we know": leave it alone
        return False
    finally:
        for m, training in modes:
            m.training = training
    (ref, ref_g), (got, got_g) = results
    tol = 8 * torch.finfo(param.dtype).eps if param.dtype.is_floating_point else 0.0
    return (ref.dtype == got.dtype and ref.shape == got.shape and torch.equal(ref, got)
            and torch.allclose(got_g, ref_g, rtol=tol, atol=tol * float(ref_g.abs().max())))


def apply_lean_activations(model) -> int:
    """Give the model's Llama-family RMSNorms and SwiGLU MLPs the lean forward (per instance).

    Each class is checked once against its own forward first and left alone on any difference;
    modules already patched are skipped, so calling it again changes nothing. Returns how many
    modules this call patched (`remove_lean_activations` undoes it)."""
    verdicts: dict = {}
    patched = 0
    for module in model.modules():
        lean = _candidate(module)
        if lean is None:
            continue
        params = list(module.parameters())
        if not params:
            continue
        key = (type(module), params[0].dtype, params[0].device)
        if key not in verdicts:
            verdicts[key] = _agrees(module, lean)
        if verdicts[key]:
            module.forward = types.MethodType(lean, module)
            setattr(module, _MARK, True)
            patched += 1
    return patched


def remove_lean_activations(model) -> int:
    """Give back the class forward to every module `apply_lean_activations` patched; returns how many."""
    restored = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            restored += 1
    return restored


def set_lean_activations(model, enabled: bool) -> int:
    """`training.lean_activations` for one run: patch (enabled) or unpatch a model that an earlier
    run in this process may have patched; returns how many modules changed."""
    return apply_lean_activations(model) if enabled else remove_lean_activations(model)
