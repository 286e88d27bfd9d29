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
