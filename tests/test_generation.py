"""`generate`: base and adapters side by side; greedy equals plain PEFT; sampling is seeded."""

from __future__ import annotations

import json

import torch
from conftest import assert_user_error, run_cli


def test_generate_side_by_side(project, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert run_cli("train", "toddler_data", "--no-mlflow", "--no-progress", cwd=project).returncode == 0
    adapter = project / "adapters" / "toddler_data_lora"
    proc = run_cli("generate", "--prompt", "the dog", "--adapter", str(adapter), "--max-new-tokens", "6",
                   "--set", "training.precision=fp32", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sample = json.loads(proc.stdout)["samples"][0]
    assert set(sample) == {"prompt", "base", "toddler_data_lora"}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[tok.bos_token_id] + tok("the dog", add_special_tokens=False)["input_ids"]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                        pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    assert sample["toddler_data_lora"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    sampled = [json.loads(run_cli("generate", "--prompt", "the dog", "--temperature", "1.0", "--seed", "3",
                                  "--max-new-tokens", "8", "--json", cwd=project).stdout)["samples"][0]["base"]
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert_user_error(run_cli("generate", cwd=project), "at least one prompt")
    assert_user_error(run_cli("generate", "--prompt", "x", "--top-p", "0", cwd=project), "--top-p")


def test_stopping_at_a_line_break_keeps_the_same_first_line(tiny_model_dir):
    """The profile keeps each sample's first line: stopping there gives that same line, with
    nothing generated past it (the tiny tokenizer's byte-level alphabet has a line-break token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.models.sampling import generate_texts, line_break_ids
    from lora_project.utils.device import resolve_runtime

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    breaks = line_break_ids(tok)
    assert breaks and all("\n" in tok.decode([i]) or len(("x" + tok.decode([i]) + "x").splitlines()) > 1
                          for i in breaks)
    assert tok.convert_tokens_to_ids("Ċ") in breaks  # byte-level BPE's "\n"
    args = dict(max_new_tokens=24, temperature=1.0, top_p=1.0, seed=5)
    runtime = resolve_runtime("cpu", "fp32", 1)
    prompts = ["the dog", "a", "mommy", "the cat", "we", "go"]
    full = generate_texts(model, tok, prompts, runtime, **args)
    stopped = generate_texts(model, tok, prompts, runtime, stop_at_line_break=True, **args)
    assert any(len(f.splitlines()) > 1 for f in full)  # some continuation did cross a line break
    for f, s in zip(full, stopped):
        assert (f.splitlines() or [""])[0] == (s.splitlines() or [""])[0]
        assert len(s.splitlines()) <= 1 and len(s) <= len(f)
