"""Issue 31, findings B, C and D: each a reproduction of a probe failure, fixed in its mechanism.

B: no adapter may change the base that other models in the same run see.
C: one line, and the right advice.
D: no number where the quantity is undefined.
Tiny models built in code; all in this process.
"""

from __future__ import annotations

import json

import torch
from conftest import assert_user_error, run_cli
from test_inspection import make_adapter


def _zero_update(folder):
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    tensors = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in load_file(f).items()}
    save_file(tensors, f)


# --- D: inspect compare of an adapter whose update is exactly zero ------------------------------


def test_compare_of_a_zero_update_says_undefined_not_one(tiny_model_dir, tmp_path):
    from lora_project.inspection.analysis import compare_adapters
    from lora_project.models.lora_factors import load_adapter

    zero = make_adapter(tiny_model_dir, tmp_path / "zero_lora", 1)
    _zero_update(zero)
    other = make_adapter(tiny_model_dir, tmp_path / "other_lora", 2)
    report = compare_adapters(load_adapter(zero), load_adapter(other), None)
    assert report["mean_phi_top1"] is None and report["mean_phi_full"] is None
    assert all(r["phi_top1"] is None and r["phi_full"] is None for r in report["modules"])
    assert all("zero_lora" in r["undefined"] for r in report["modules"])
    same = compare_adapters(load_adapter(zero), load_adapter(zero), None)  # was 1.000: identical zeros
    assert same["mean_phi_full"] is None


def test_compare_cli_prints_undefined_for_a_zero_update(project, tiny_model_dir):
    zero = make_adapter(tiny_model_dir, project / "adapters" / "zero_lora", 1)
    _zero_update(zero)
    other = make_adapter(tiny_model_dir, project / "adapters" / "other_lora", 2)
    proc = run_cli("inspect", "compare", str(zero), str(other), "--out", "plots",
                   "--set", f"model.source={tiny_model_dir}", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "undefined" in proc.stdout and "1.000" not in proc.stdout, proc.stdout
    proc = run_cli("inspect", "compare", str(zero), str(other), "--out", "plots", "--json",
                   "--set", f"model.source={tiny_model_dir}", cwd=project)
    report = json.loads(proc.stdout)
    assert report["mean_phi_top1"] is None and report["modules"][0]["phi"] is None


# --- C: one line, and the right advice ----------------------------------------------------------


def test_ui_bad_host_blames_the_host_not_the_port(project):
    proc = run_cli("ui", "--host", "999.1.1.1", "--port", "7871", cwd=project)
    assert_user_error(proc, "--host 999.1.1.1")
    assert "port" not in proc.stderr.lower().split("--host")[0] and "warning" not in proc.stderr, proc.stderr
    assert not (project / "outputs" / "ui").exists()


def test_ui_busy_port_advises_the_port_option_not_gradio_settings(project):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("ui", "--port", str(port), cwd=project)
    assert_user_error(proc, f"--port {port} is in use", "--port")
    assert "GRADIO_SERVER_PORT" not in proc.stderr and "launch()" not in proc.stderr, proc.stderr


# --- B: no adapter may change the base that other models in the same run see ------------------


def _head_adapter(tiny_model_dir, folder):
    """An adapter on the tied output layer, as PEFT saves it (with a full copy of the embedding),
    its copy differing from the base's (as when it was saved from a base loaded at another precision)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], init_lora_weights=False))
    model.save_pretrained(str(folder))
    f = folder / "adapter_model.safetensors"
    tensors = load_file(f)
    full = [k for k in tensors if "lora_" not in k]
    assert full, "PEFT saved no embedding copy: the reproduction needs one"
    save_file({k: (v * 1.01 if k in full else v) for k, v in tensors.items()}, f)
    return folder


def test_train_refuses_the_output_layer_as_a_target_in_one_line(project):
    from conftest import snapshot

    before = snapshot(project)
    proc = run_cli("train", "toddler_data", "--no-mlflow", "--set", "lora.target_modules=[q_proj,lm_head]",
                   cwd=project)
    assert_user_error(proc, "lm_head", "output layer")
    assert snapshot(project) == before
    proc = run_cli("train", "toddler_data", "--no-mlflow", "--set", "lora.target_modules=[nope_proj]", cwd=project)
    assert_user_error(proc, "nope_proj", "q_proj")
    assert "lm_head" not in proc.stderr, "the list of offered targets names the output layer"


def _scores(project, adapters):
    args = ["evaluate", "--text", "corpus.txt", "--json"]
    for a in adapters:
        args += ["--adapter", str(a)]
    proc = run_cli(*args, cwd=project)
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 else None)


def _numbers(res, label):
    return {k: v for k, v in res["models"][label].items() if isinstance(v, (int, float))}


def _unbound(folder):
    """Made on the tiny base with a made-up fingerprint: not bound to the base's real one."""
    meta_path = folder / "lora_project.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"].pop("fingerprint")
    meta_path.write_text(json.dumps(meta))
    return folder


def test_evaluating_adapters_together_gives_each_the_numbers_it_gets_alone(project, tiny_model_dir):
    (project / "corpus.txt").write_text("the cat sat on the mat . where is the ball ? more juice please .\n" * 6)
    root = project / "adapters"
    plain = _unbound(make_adapter(tiny_model_dir, root / "plain_lora", 1))
    wide = _unbound(make_adapter(tiny_model_dir, root / "wide_lora", 2, r=2,
                                 targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    rs = _unbound(make_adapter(tiny_model_dir, root / "rs_lora", 3, rslora=True))
    head = _head_adapter(tiny_model_dir, root / "head_lora")
    alone = {}
    for a in (plain, wide, rs):
        proc, res = _scores(project, [a])
        assert proc.returncode == 0, proc.stderr
        alone[a.name] = _numbers(res, a.name)
        alone.setdefault("base", _numbers(res, "base"))
        assert _numbers(res, "base") == alone["base"]
    for group in ([plain, wide, rs], [rs, plain], [plain, head, wide], [head, rs]):
        proc, res = _scores(project, group)
        if head in group:  # it would change the shared base: refused before any scoring, in one line
            assert_user_error(proc, "head_lora", "lm_head")
            continue
        assert proc.returncode == 0, proc.stderr
        assert _numbers(res, "base") == alone["base"]
        for a in group:
            assert _numbers(res, a.name) == alone[a.name], a.name


def test_fused_batch_refuses_a_config_before_loading_the_model(project, monkeypatch):
    from lora_project.models import base_model

    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded before a refusal the configs alone could make")

    monkeypatch.setattr(base_model, "load_base", no_loading)
    (project / "config" / "batch_config.yaml").write_text(
        "datasets:\n  kids:\n    training: {keep_best: true, eval_interval: 2}\n")
    proc = run_cli("train-batch", "toddler_data", "kids", "--fused", "--no-progress", "--no-mlflow", cwd=project)
    assert_user_error(proc, "kids", "keep_best")


def test_fused_batch_failure_names_the_dataset_at_fault(project):
    (project / "config" / "batch_config.yaml").write_text(
        "datasets:\n  kids:\n    lora: {target_modules: [nope_proj]}\n")
    proc = run_cli("train-batch", "toddler_data", "kids", "--fused", "--no-progress", "--no-mlflow", "--json",
                   cwd=project)
    assert proc.returncode == 2, proc.stderr[-2000:]
    rows = {r["dataset"]: r for r in json.loads(proc.stdout)["datasets"]}
    assert "nope_proj" in rows["kids"]["reason"]
    assert "nope_proj" not in rows["toddler_data"]["reason"], rows["toddler_data"]["reason"]
    assert "kids" in rows["toddler_data"]["reason"] and rows["toddler_data"]["status"] == "failed"


def _only_line(proc, *fragments):
    assert_user_error(proc, *fragments)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # no warning before the error about the same thing


def test_profile_chat_on_a_file_that_is_not_chat_is_one_line_saying_why(project):
    (project / "notes.txt").write_text("not a transcript\njust lines\n")
    _only_line(run_cli("profile", "--chat", "notes.txt", cwd=project), "notes.txt", "not a CHAT transcript")


def test_profile_chat_with_an_unknown_encoding_names_the_encoding(project):
    (project / "t.cha").write_text("@UTF8\n@Begin\n@Participants:\tCHI Target_Child\n*CHI:\tmore cookie .\n@End\n")
    _only_line(run_cli("profile", "--chat", "t.cha", "--encoding", "klingon", cwd=project),
               "--encoding 'klingon'", "unknown encoding")


def test_evaluate_pairs_with_every_line_bad_is_one_line(project):
    (project / "p.jsonl").write_text('{"x": 1}\nnot json\n')
    _only_line(run_cli("evaluate", "--pairs", "p.jsonl", cwd=project), "no usable minimal pairs", "line 2")


def test_prepare_advises_the_catalog_option_not_a_flag_it_does_not_have(project):
    path = project / "config" / "dataset_catalog.csv"
    head = path.read_text().splitlines()[0]
    path.write_text(f"{head}\nu16,local,data/raw/u16.txt,,,,,,,,true\nlat,local,data/raw/lat.jsonl,,,,,,,,true\n")
    (project / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (project / "data" / "raw" / "u16.txt").write_bytes("one line\ntwo\n".encode("utf-16"))
    (project / "data" / "raw" / "lat.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    for name, fragments in (("u16", ["encoding=utf-16 in the row's options"]), ("lat", ["encoding=ENCODING"])):
        proc = run_cli("prepare", name, "--no-tokens", cwd=project)
        assert_user_error(proc, *fragments)
        assert "--encoding" not in proc.stderr, proc.stderr
