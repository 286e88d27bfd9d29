"""The numerics of a minimal-pair scoring pass: exact fp32, or the fast bf16 first pass.

fp32 is the reference: autocast off, the model's own attention, the linear layers on this process's
fp32 kernel (oneDNN's where PyTorch has it: the same arithmetic, models/kernels.py). The bf16 first pass trades exactness
for speed on CPUs with native bf16; `score_pairs` re-scores in fp32 every pair whose bf16 difference
lies within the margin measured for it (minimal_pairs.MARGINS). What keeps its error down:

- **Layers that write huge values stay fp32.** Small LMs write a few huge values into the residual
  stream (SmolLM2-135M: about 25,000 at the BOS and up to 1,800 at some first words, in one channel)
  and remove them in the last layers; a bf16 output there is off by up to half a bf16 step (4 at
  1,800), which the removal leaves behind. Before the pass, one fp32 forward over a calibration row
  records each linear layer's largest |output|; those above `SENSITIVE_OUTPUT` (11 of SmolLM2's 210)
  run in fp32. The positions that carry such values are scored again in fp32 (tree_pass.py).
- **Attention in fp32** for models on SDPA attention (the model's SDPA on fp32 inputs; in the
  prefix tree's passes the chunked tree attention, also fp32: evaluation/tree_attention.py): a
  few percent of the pass's time. Eager attention stays under bf16 autocast.
- **The output layer in bf16, its result corrected.** Logits are bf16 in chunks of `HEAD_CHUNK`
  tokens; one bf16 softmax (fp32 accumulation inside) gives p(target), and the target's own logit is
  recomputed in fp32 (one dot product), so only the normaliser carries bf16 rounding: 2.3x faster
  than an fp32 log-softmax over the bf16 logits.

Only `torch.nn.Linear` layers are cast or kept in fp32 (GPT-2's `Conv1D` layers run under bf16
autocast), and the margin was measured on SmolLM2-135M only, which is why `--first-pass auto` never
picks this pass. What remains on SmolLM2 is a rare tail: a position whose hidden state bf16 sends elsewhere (largest pair error
2.8 nats in 6,700 BLiMP pairs; 7.08 nats on the whole filtered BLiMP, where 2 of 59,875 pairs erred
beyond the margin: research notes), which the margin covers only as far as it was measured.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from lora_project.models.kernels import fp32_linears, linear

FIRST_PASSES = ("fp32", "bf16")

#: |output| above which a linear layer runs in fp32 during the bf16 pass: from 128 up, a bf16 step is
#: at least 1, so rounding alone writes errors of 0.5 and more into the residual stream.
SENSITIVE_OUTPUT = 100.0
HEAD_CHUNK = 256
ATTENTION = "lora_project_fp32_attention"


def fp32_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own SDPA attention, run in fp32 (inside the bf16 pass, and where the tree's chunks do not apply)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def sensitive_linears(model, batch: dict, head=None) -> dict:
    """The linear layers (name -> module) whose largest |output| on `batch` (decoder inputs), computed in
    fp32, exceeds SENSITIVE_OUTPUT; the output layer `head` is left out (the pass handles it)."""
    import torch

    peak: dict[str, float] = {}
    handles = []
    skip = {id(m) for m in head.modules()} if head is not None else set()  # a LoRA'd head's inner layers too
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) not in skip}
    for name, module in linears.items():
        handles.append(module.register_forward_hook(
            lambda m, i, o, name=name: peak.__setitem__(name, max(peak.get(name, 0.0), float(o.abs().max())))))
    try:
        with torch.inference_mode(), torch.autocast(batch["input_ids"].device.type, enabled=False):
            model.get_decoder()(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: linears[n] for n, v in peak.items() if v > SENSITIVE_OUTPUT}


@contextmanager
def precision_context(path: str, device: str, model=None, calibration: dict | None = None):
    """The numerics of one scoring pass. fp32: autocast off, the linear layers on the process's fp32
    kernel (models/kernels.fp32_linears). bf16: autocast, each linear weight but the
    output layer's cast to bf16 once per pass, SDPA attention in fp32, and with a `calibration` batch
    the sensitive layers in fp32; all restored after. Yields the sensitive layers' names."""
    import torch

    if path not in FIRST_PASSES:
        from lora_project.errors import UserError

        raise UserError(f"unknown first pass {path!r}; choose one of {', '.join(FIRST_PASSES)}")
    swapped, kept, config, attn = [], {}, None, None
    try:
        if path == "bf16" and model is not None:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            head = base.get_output_embeddings()
            skip = {id(m) for m in head.modules()} if head is not None else set()
            if calibration is not None:
                kept = sensitive_linears(base, calibration, head)
                for module in kept.values():
                    module.forward = _fp32_forward(module)
                    skip.add(id(module))
            config = getattr(base.get_decoder(), "config", None)
            if getattr(config, "_attn_implementation", None) == "sdpa":
                from transformers import AttentionInterface

                AttentionInterface.register(ATTENTION, fp32_attention)
                attn, config._attn_implementation = config._attn_implementation, ATTENTION
            with torch.no_grad():
                for module in model.modules():
                    weight = getattr(module, "weight", None)
                    if (isinstance(module, torch.nn.Linear) and weight is not None and weight.dtype == torch.float32
                            and id(module) not in skip):
                        swapped.append((module, weight))
                        module.weight = torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
        with ExitStack() as stack:
            if path == "fp32" and model is not None:
                stack.enter_context(fp32_linears(model, device))
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16, enabled=path == "bf16"))
            yield sorted(kept)
    finally:
        for module, weight in swapped:
            module.weight = weight
        for module in kept.values():
            del module.forward
        if attn is not None:
            config._attn_implementation = attn


def _fp32_forward(module):
    import torch

    def forward(x):
        with torch.autocast(x.device.type, enabled=False):
            return linear(x.float(), module.weight, module.bias)
    return forward


def head_logprobs(hidden, head, targets, chunk: int = HEAD_CHUNK):
    """log p(target) per row of `hidden` for the bf16 pass: bf16 logits and softmax, the target's logit
    in fp32 (so log p = exact logit - bf16 normaliser). A head that is not a plain fp32 linear layer,
    and rows whose bf16 probability underflows, get the fp32 computation."""
    import torch

    from lora_project.models.losses import token_nll

    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or weight is None or weight.dtype != torch.float32:
        with torch.autocast(hidden.device.type, enabled=False):  # fp32, also inside the bf16 pass
            return -token_nll(hidden.float(), head, targets)
    h = hidden.float()
    out = torch.empty(targets.shape, dtype=torch.float32, device=h.device)
    w16 = weight.to(torch.bfloat16)
    bias = head.bias
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = hc.to(torch.bfloat16) @ w16.t()
            exact = (hc * weight[tc]).sum(-1)
            if bias is not None:
                logits = logits + bias.to(torch.bfloat16)
                exact = exact + bias[tc]
            rows = torch.arange(len(tc), device=h.device)
            p = torch.softmax(logits, -1)[rows, tc].float()
            out[s:s + chunk] = torch.log(p) + (exact - logits[rows, tc].float())
            tiny = p < 1e-30
            if bool(tiny.any()):
                lf = hc[tiny] @ weight.t() + (bias if bias is not None else 0)
                out[s:s + chunk][tiny] = lf.gather(1, tc[tiny][:, None]).squeeze(1) - torch.logsumexp(lf, -1)
    return out
