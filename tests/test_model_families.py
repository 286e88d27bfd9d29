"""Bring your own base model: tiny random models of six non-Llama families, saved as local folders.

For each family: load through load_base, train a few steps, score text (nll_sum equal to a direct
full-logits computation), score minimal pairs, generate, save, load in plain PEFT (same logits),
inspect (W0 read the right way round), merge and export, refuse a foreign base naming both.
One shared byte-level BPE tokenizer; each family gets the special tokens its real tokenizer has
(GPT-2: <|endoftext|> is BOS and EOS, no pad; Qwen2: no BOS at all; OPT: </s> as BOS; Gemma: <bos>).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, TINY_TEXT, run_cli

from lora_project.config import LoraSection, TrainingSection, load_config
from lora_project.errors import UserError
from lora_project.models.tokens import prefix_id

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>", "<bos>", "<eos>", "<unk>"]
# family -> (tokenizer special tokens, what `auto` resolves to)
FAMILIES = {
    "gpt2": ({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, ["c_attn"]),
    "opt": ({"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>"}, ["q_proj", "v_proj"]),
    "gpt_neox": ({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, ["query_key_value"]),
    "qwen2": ({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, ["q_proj", "v_proj"]),
    "gemma2": ({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, ["q_proj", "v_proj"]),
    "phi": ({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, ["q_proj", "v_proj", "fc1", "fc2"]),
}


def _model_config(family: str, tok):
    import transformers as tf

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    v, h, inter = len(tok), 32, 64
    if family == "gpt2":
        # no dropout in the base (GPT-2's is 0.1): fused training then matches training alone exactly
        return tf.GPT2Config(vocab_size=v, n_embd=h, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "opt":  # word_embed_proj_dim < hidden: OPT-350m's project_in / project_out
        return tf.OPTConfig(vocab_size=v, hidden_size=h, ffn_dim=inter, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=16, **ids)
    if family == "gpt_neox":  # untied output layer (embed_out), partial rotary, as Pythia
        return tf.GPTNeoXConfig(vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25,
                                tie_word_embeddings=False, **ids)
    if family == "qwen2":  # q/k/v biases, grouped-query attention, tied embeddings
        return tf.Qwen2Config(vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              tie_word_embeddings=True, **ids)
    if family == "gemma2":  # final logit soft-capping (small cap so that it matters at these logit sizes)
        return tf.Gemma2Config(vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                               max_position_embeddings=256, sliding_window=64, attn_logit_softcapping=None,
                               final_logit_softcapping=1.0, **ids)
    if family == "phi":  # an output layer with a bias
        return tf.PhiConfig(vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5, **ids)
    raise ValueError(family)


@pytest.fixture(scope="session")
def shared_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + 60, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT * 5, trainer)
    return tok


def build_family_model(family: str, folder, bpe, seed: int = 0):
    """A 2-layer random model of `family` (hidden 32) with the shared tokenizer, saved as a local folder."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, **FAMILIES[family][0])
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_model_config(family, fast))
    with torch.no_grad():  # random weights at a scale that gives logits of order 1
        for name, p in model.named_parameters():
            if p.ndim == 2 and "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, shared_bpe):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family_model(f, root / f, shared_bpe) for f in FAMILIES}


def _base(folder):
    from lora_project.models.base_model import load_base

    return load_base(load_config([], [f"model.source={folder}", "training.precision=fp32", "training.threads=1",
                                      "training.device=cpu"]))


def _train(base, steps=3, checkpointing=False):
    from lora_project.models.lora_model import wrap_with_lora
    from lora_project.models.tokens import pack_documents
    from lora_project.training.trainer import BlockLoader, LoraTrainer

    model = wrap_with_lora(base.model, LoraSection(r=4, alpha=8, dropout=0.0), seed=0)
    t = TrainingSection(seq_len=16, batch_size=2, max_steps=steps, warmup_steps=0, lr=0.05, schedule="constant",
                        log_interval=steps, precision="fp32", gradient_checkpointing=checkpointing)
    stream = pack_documents(base.tokenizer, TINY_TEXT * 4)
    LoraTrainer(model, t, BlockLoader(stream, 16, 2, 0), base.runtime, []).fit()
    return model.eval()


def _direct_nll(model, ids, max_length, stride):
    from lora_project.models.scoring import windows

    total = 0.0
    with torch.no_grad():
        for b, e, first in windows(len(ids), max_length, stride):
            logp = torch.log_softmax(model(torch.tensor([ids[b:e - 1]])).logits[0].double(), -1)
            total -= sum(float(logp[j - 1 - b, ids[j]]) for j in range(first, e))
    return total


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_scores_generates_inspects_merges(family, family_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_project.evaluation.minimal_pairs import (
        Pair,
        score_pairs,
        sentence_logprobs,
    )
    from lora_project.inspection.analysis import analyse_weights
    from lora_project.models.lora_factors import BaseWeights, load_adapter
    from lora_project.models.lora_model import attach_adapters, save_adapter
    from lora_project.models.merge import export_merged_model, merge_adapters
    from lora_project.models.sampling import generate_texts
    from lora_project.models.scoring import check_decoder_and_head, score_text

    folder = family_dirs[family]
    base = _base(folder)
    tok = base.tokenizer
    # The prefix token: BOS where the tokenizer has one (GPT-2 / NeoX / Phi: <|endoftext|>, which is also
    # their EOS), else EOS (Qwen2 has no BOS).
    assert prefix_id(tok) == (tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    assert check_decoder_and_head(base.model) < 1e-4  # the split reproduces this family's own logits
    model = _train(base)
    targets = FAMILIES[family][1]
    assert sorted(model.peft_config["default"].target_modules) == sorted(targets)
    assert model.peft_config["default"].fan_in_fan_out == (family == "gpt2")

    # Evaluation: sliding windows equal a direct full-logits computation.
    text = "the dog runs to the ball. mommy want juice. where ball?"
    s = score_text(model, tok, text, base.runtime, max_length=12, stride=5, batch_size=3)
    ids = [prefix_id(tok)] + tok(text, add_special_tokens=False)["input_ids"]
    assert s.tokens == len(ids) - 1
    assert s.nll_sum == pytest.approx(_direct_nll(model, ids, 12, 5), rel=1e-5)

    # Minimal pairs: the shared-prefix scorer equals plain per-sentence sums, which equal full logits.
    pairs = [Pair("the dog runs.", "the dog run.", "agr"), Pair("more cookie please.", "cookie more please.", "o")]
    scores = score_pairs(model, tok, pairs, base.runtime, "fp32", full=True)
    plain = sentence_logprobs(model, tok, [p.good for p in pairs] + [p.bad for p in pairs], base.runtime)
    assert scores.good + scores.bad == pytest.approx(plain, rel=1e-4, abs=1e-4)
    one = [prefix_id(tok)] + tok("the dog runs.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([one])).logits[0].double(), -1)
    assert plain[0] == pytest.approx(sum(float(logp[i - 1, one[i]]) for i in range(1, len(one))), rel=1e-5)

    # Generation: greedy continuation equals argmax over full logits, step by step.
    (got,) = generate_texts(model, tok, ["the dog"], base.runtime, max_new_tokens=4, temperature=0, top_p=1, seed=0)
    seq = [prefix_id(tok)] + tok("the dog", add_special_tokens=False)["input_ids"]
    start = len(seq)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            if seq[-1] == tok.eos_token_id:
                break
    assert got == tok.decode(seq[start:], skip_special_tokens=True)

    # The adapter: plain PEFT on a fresh base gives the same logits.
    x = torch.tensor([ids[:10]])
    with torch.no_grad():
        expected = model(x).logits
    meta = {"base_model": {"name": f"tiny-{family}", "fingerprint": base.ref.fingerprint,
                           "directory": str(base.ref.directory)}}
    adapter = save_adapter(model, tmp_path / "a_lora", meta, overwrite=False)
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == sorted(targets)
    fresh = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        base_logits = fresh(x).logits
        plain_peft = PeftModel.from_pretrained(fresh, str(adapter)).eval()(x).logits
    assert torch.allclose(plain_peft, expected, atol=1e-5)
    assert not torch.allclose(plain_peft, base_logits, atol=1e-3)  # training changed the model

    # Inspection: each update against the live layer's W0 in the nn.Linear orientation (d_out x d_in).
    live = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    report = analyse_weights(load_adapter(adapter), BaseWeights(folder))
    assert {r["module"] for r in report["modules"]} == set(targets)
    for row in report["modules"]:
        layer = live[row["name"]]
        w0 = layer.get_base_layer().weight.detach().double()
        w0 = w0.T if family == "gpt2" else w0  # Conv1D stores d_in x d_out
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double() * layer.scaling[
            "default"]
        assert tuple(delta.shape) == tuple(w0.shape) == tuple(row["shape"])
        assert row["relative_update"] == pytest.approx(float(delta.norm() / w0.norm()), rel=1e-6)
        u, sv, vh = torch.linalg.svd(delta)
        r = layer.r["default"]
        direct_amp = float(sv[:r].norm() / (u[:, :r].T @ w0 @ vh[:r].T).norm())
        assert row["amplification"] == pytest.approx(direct_amp, rel=1e-5)
        assert isinstance(row["layer"], int)
    base.model = model.unload()

    # A base with another fingerprint is refused, naming both bases.
    with pytest.raises(UserError, match=rf"tiny-{family}.*not on the loaded base other-base"):
        attach_adapters(base.model, [adapter], "0" * 64, "other-base")

    # Merge (one adapter, weight 1: the same update) and export into the weights: same logits.
    merged = merge_adapters(base, [adapter], [1.0], "linear", tmp_path / "m_lora")
    with torch.no_grad():
        again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder).eval(), str(merged))(x).logits
    assert torch.allclose(again, expected, atol=1e-5)
    export_merged_model(base, adapter, tmp_path / "exported")
    with torch.no_grad():
        baked = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()(x).logits
    assert torch.allclose(baked, expected, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "gemma2"])
def test_gradient_checkpointing_gives_the_same_adapter(family, family_dirs):
    runs = []
    for checkpointing in (False, True):
        base = _base(family_dirs[family])
        model = _train(base, steps=2, checkpointing=checkpointing)
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    assert runs[0].keys() == runs[1].keys() and runs[0]
    assert all(torch.allclose(runs[0][n], runs[1][n], atol=1e-5) for n in runs[0])
    assert any(float(runs[0][n].abs().max()) > 0 for n in runs[0] if "lora_B" in n)  # it did train


def test_target_modules_auto_all_linear_and_unknown_names(family_dirs):
    from transformers import AutoModelForCausalLM

    from lora_project.models.lora_model import (
        check_targets,
        linear_module_names,
        lora_config,
        wrap_with_lora,
    )

    gpt2 = AutoModelForCausalLM.from_pretrained(family_dirs["gpt2"])
    neox = AutoModelForCausalLM.from_pretrained(family_dirs["gpt_neox"])
    assert check_targets(gpt2, LoraSection(target_modules=["all-linear"])) == ["c_attn", "c_fc", "c_proj"]
    assert check_targets(neox, LoraSection(target_modules=["all-linear"])) == [
        "dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]  # not the output layer embed_out
    assert lora_config(LoraSection(target_modules=["c_fc"]), gpt2).fan_in_fan_out
    wrapped = wrap_with_lora(gpt2, LoraSection(), 0)  # a second adapter sees the same layer names and kinds
    assert linear_module_names(wrapped.get_base_model()) == ["c_attn", "c_fc", "c_proj", "lm_head"]
    assert lora_config(LoraSection(target_modules=["c_attn"]), wrapped.get_base_model()).fan_in_fan_out
    gpt2 = wrapped.unload()
    with pytest.raises(UserError, match=r"q_proj, v_proj not found in the model \(gpt2\); linear modules are: "
                                        r"c_attn, c_fc, c_proj$"):  # not the output layer
        check_targets(gpt2, LoraSection(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(UserError, match="stands alone"):
        check_targets(neox, LoraSection(target_modules=["auto", "dense"]))
    with pytest.raises(UserError, match="lora.target_modules: 'all-linear' stands alone"):
        load_config([], ["lora.target_modules=[q_proj, all-linear]"])
    assert load_config([], ["lora.target_modules=all-linear"]).lora.target_modules == ["all-linear"]
    neox.config.model_type = "made_up"
    with pytest.raises(UserError, match="auto has no default for architecture 'made_up'.*query_key_value"):
        check_targets(neox, LoraSection())


def test_unknown_logit_postprocessing_is_refused(family_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lora_project.models import scoring
    from lora_project.models.scoring import check_decoder_and_head

    checked = []
    monkeypatch.setattr(scoring, "check_decoder_and_head", lambda m: checked.append(m.config.model_type))
    _base(family_dirs["qwen2"])
    monkeypatch.setattr(scoring, "TESTED_FAMILIES", frozenset({"gpt2"}))
    _base(family_dirs["qwen2"])
    assert checked == ["qwen2"]  # a family the tests do not cover is checked when it loads

    model = AutoModelForCausalLM.from_pretrained(family_dirs["gemma2"]).eval()
    assert check_decoder_and_head(model) < 1e-5  # the soft-capping is reproduced
    model.config.final_logit_softcapping, forward_cap = None, 1.0  # our head no longer caps, the forward does
    original = model.forward

    def capped(*a, **k):
        out = original(*a, **k)
        out.logits = torch.tanh(out.logits / forward_cap) * forward_cap
        return out

    model.forward = capped
    with pytest.raises(UserError, match="not supported for scoring"):
        check_decoder_and_head(model)


@pytest.mark.slow  # ~10 s each: the whole train / evaluate path, MLflow included
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_cli_train_and_evaluate_another_base_with_the_default_config(family, project, tracking_store, family_dirs,
                                                                   tiny_model_dir):
    """`lora-project train NAME --set model.source=FOLDER` with the repository's own model_config.yaml
    (target_modules: auto): adapter, experiment folder, MLflow run, evaluation."""
    from mlflow.tracking import MlflowClient

    (project / "config" / "model_config.yaml").write_text((REPO / "config" / "model_config.yaml").read_text())
    src = f"model.source={family_dirs[family]}"
    if family == "gpt2":  # learned positions: a sequence past them is refused before any work
        proc = run_cli("train", "toddler_data", "--set", src, "--set", "training.seq_len=300", cwd=project)
        assert proc.returncode == 2 and "training.seq_len=300 exceeds the model's context of 256" in proc.stderr
    proc = run_cli("train", "toddler_data", "--json", "--no-progress", "--set", src, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["status"] == "FINISHED"
    assert math.isfinite(res["metrics_after"]["perplexity"]) and res["metrics_after"]["perplexity"] > 1
    adapter = project / "adapters" / "toddler_data_lora"
    meta = json.loads((adapter / "lora_project.json").read_text())
    assert meta["config"]["lora"]["target_modules"] == FAMILIES[family][1]  # resolved, not 'auto'
    assert meta["base_model"]["name"] == str(family_dirs[family])
    assert "target_modules:\n  - " + FAMILIES[family][1][0] in (project / "experiments" / "exp_001_toddler_data" /
                                                                 "config.yaml").read_text()
    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert FAMILIES[family][1][0] in run.data.params["lora.target_modules"]  # the resolved names, not 'auto'
    assert run.data.metrics["val_perplexity"] == pytest.approx(res["metrics_after"]["perplexity"])
    evaluate = ("evaluate", "--dataset", "toddler_data", "--split", "validation", "--adapter", str(adapter), "--json",
                "--set", src)  # the one scoring: training validates with the same windows
    proc = run_cli(*evaluate, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(proc.stdout)["models"]
    # eval_max_tokens (400) covers the whole tiny validation split: the run's own before/after numbers
    assert scores["base"]["perplexity"] == pytest.approx(res["metrics_before"]["perplexity"], rel=1e-3)
    assert scores["toddler_data_lora"]["perplexity"] == pytest.approx(res["metrics_after"]["perplexity"], rel=1e-3)
    if family == "gpt2":  # the default window is GPT-2's context (256 here); a longer one asked for is refused
        assert json.loads(proc.stdout)["max_length"] == 256
        proc = run_cli(*evaluate, "--max-length", "1024", cwd=project)
        assert proc.returncode == 2 and "exceeds the model's context of 256 positions" in proc.stderr
    # The same adapter on the default tiny Llama base of the project is refused, naming both bases.
    proc = run_cli("evaluate", "--dataset", "toddler_data", "--adapter", str(adapter), "--set",
                   f"model.source={tiny_model_dir}", cwd=project)
    assert proc.returncode == 2 and str(family_dirs[family]) in proc.stderr and "not on the loaded base" in proc.stderr
