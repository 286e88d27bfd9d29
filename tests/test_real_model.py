"""Integration on the real embedded default model (SmolLM2-135M-Instruct from the GGUF package).

Marked slow: the first run converts the GGUF once (~30 s); later loads come from the cache.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture()
def real_project(project):
    """The temporary project, but with the committed model config (the embedded default)."""
    (project / "config" / "model_config.yaml").write_text((REPO / "config" / "model_config.yaml").read_text())
    return project


def test_embedded_model_trains_evaluates_and_loads_with_plain_peft(real_project, tracking_store):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_project.models.base_model import resolve_model

    proc = run_cli("train", "toddler_data", "--json", "--no-progress",
                   "--set", "training.max_steps=3", "--set", "training.batch_size=2",
                   "--set", "training.seq_len=32", "--set", "training.eval_max_tokens=300",
                   "--set", "training.lr=2e-3", "--set", "training.precision=fp32",
                   "--set", "training.threads=0", cwd=real_project, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["tokens_seen"] == 3 * 2 * 32
    assert res["metrics_before"]["perplexity"] > res["metrics_after"]["perplexity"] > 1
    adapter = real_project / "adapters" / "toddler_data_lora"
    meta = json.loads((adapter / "lora_project.json").read_text())
    assert meta["base_model"]["name"] == "embedded"

    # Plain PEFT on the same base gives the same logits as our own evaluation path.
    ref = resolve_model("embedded")
    assert meta["base_model"]["fingerprint"] == ref.fingerprint
    tok = AutoTokenizer.from_pretrained(ref.directory)
    base = AutoModelForCausalLM.from_pretrained(ref.directory, dtype=torch.float32).eval()
    ids = torch.tensor([[tok.bos_token_id] + tok("mommy want juice.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    assert not torch.allclose(base_logits, peft_logits, atol=1e-4)

    text = real_project / "t.txt"
    text.write_text("mommy want juice.")
    ev = run_cli("evaluate", "--text", str(text), "--adapter", str(adapter), "--json",
                 "--set", "training.precision=fp32", cwd=real_project, timeout=900)
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = json.loads(ev.stdout)["models"]
    for name, logits in (("base", base_logits), ("toddler_data_lora", peft_logits)):
        logp = torch.log_softmax(logits[0].double(), -1)
        direct = -sum(float(logp[j - 1, ids[0, j]]) for j in range(1, ids.shape[1]))
        assert out[name]["nll_sum"] == pytest.approx(direct, rel=1e-4)
        assert out[name]["perplexity"] == pytest.approx(math.exp(direct / (ids.shape[1] - 1)), rel=1e-4)


def test_stories_from_the_embedded_model_are_seeded_and_deduplicated(real_project):
    """generate-data --kind stories: chat template, sampling, seed -> same text, dedupe counts."""
    from lora_project.config import load_config
    from lora_project.data.stories import write_stories
    from lora_project.models.base_model import load_base

    themes = real_project / "config" / "story_themes.yaml"
    themes.write_text(themes.read_text().replace("max_new_tokens: 160", "max_new_tokens: 40"))
    cfg = load_config([real_project / "config" / "model_config.yaml",
                       real_project / "config" / "training_config.yaml"], ["training.threads=0"])
    base = load_base(cfg)
    out = real_project / "data" / "raw" / "stories.txt"
    runs = []
    for seed in (5, 5, 7):
        summary = write_stories(cfg, themes, out, 2, seed, batch_size=2, progress=False, base=base)
        runs.append(out.read_text())
        assert summary["stories"] == 2 and summary["generated"] == 2 + summary["duplicates"] + summary["unfinished"]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    stories = runs[0].splitlines()
    assert len(set(stories)) == 2 and all(s[-1] in '.!?"\u201d' and len(s.split()) >= 5 for s in stories)
