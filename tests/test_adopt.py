"""`lora-project adopt OLD_DIR` and `lora-project catalog`: a messy old project moves in without loss.

The old project is built in code: scattered scripts that import each other, temp folders,
adapters in six places (plain, in a temp folder, in a Trainer checkpoint, in .bin form, one
broken, one for another base), raw txt/jsonl/CHAT files, an MLflow file store with two runs
(made by MLflow itself, with MLFLOW_ALLOW_FILE_STORE=true, in a subprocess), a notebook with
its checkpoint folder, logs, caches and a symlink out of the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, snapshot

from lora_project.paths import ProjectPaths

CHAT = """@UTF8
@Begin
@Languages:\teng
@Participants:\tCHI Target_Child , MOT Mother
@ID:\teng|test|CHI|2;03.00|female|||Target_Child|||
@ID:\teng|test|MOT|||||Mother|||
*CHI:\tmore cookie .
*MOT:\tdo you want more cookies ?
*CHI:\tdoggy go outside .
*CHI:\twhere ball ?
*CHI:\tI want juice now .
*CHI:\tdaddy car .
*CHI:\tbig truck go .
*CHI:\tbye bye birdie .
*CHI:\tmommy sit here .
*CHI:\tthat my shoe .
@End
"""

MLFLOW_SCRIPT = """
import os, sys
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
import mlflow
mlflow.set_tracking_uri("file:" + sys.argv[1])
mlflow.set_experiment("toddler-lora")
for i in range(2):
    with mlflow.start_run(run_name=f"run{i}"):
        mlflow.log_params({"r": 8, "lr": 0.001 * (i + 1), "dataset": "toddler"})
        for step in range(7):
            mlflow.log_metric("loss", 3.0 - 0.25 * step - i, step=step * 10)
        mlflow.log_metric("eval_ppl", 20.0 - i, step=60)
        mlflow.set_tag("note", f"old run {i}")
        art = os.path.join(sys.argv[2], f"curve{i}.txt")
        open(art, "w").write(f"loss curve of run {i}\\n")
        mlflow.log_artifact(art)
"""

GOOD_ADAPTERS = ("my_adapter/", "tmp/run3/final_adapter/", "outputs/checkpoint-20/", "old_bin_adapter/")


def _peft_adapter(base_dir: Path, folder: Path, seed: int, r: int = 4):
    """A PEFT adapter saved by PEFT itself (random B so that the weights are not all zero)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=2 * r,
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(str(folder))
    return model


def build_old_project(root: Path, tiny: Path, other: Path, outside: Path) -> None:
    from peft import get_peft_model_state_dict

    root.mkdir(parents=True)
    w = lambda rel, text: ((root / rel).parent.mkdir(parents=True, exist_ok=True),  # noqa: E731
                           (root / rel).write_text(text))
    # scripts that import each other, from the root and from a subfolder
    w("helpers.py", "def load_text(p):\n    return open(p).read().splitlines()\n")
    w("train_single_lora.py", "import torch\nfrom helpers import load_text\n"
                              "print(len(load_text('data/toddler.txt')))\n")
    w("scripts/extract_children_speaking.py", "import helpers\nimport pylangacq_not_installed_xyz\n")
    w("config.yaml", "lora:\n  r: 8\n  lora_alpha: 16\n  target_modules: [q_proj, v_proj]\nlearning_rate: 0.0002\n"
                     "train_file: data/toddler.txt\n")
    w("requirements.txt", "torch\npeft\n")
    w("README.md", "# my old lora project\n")
    w("train.log", "step 1 loss 3.0\n")
    w("__pycache__/helpers.cpython-311.pyc", "not really bytecode")
    w("notebooks/explore.ipynb", json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    w("notebooks/.ipynb_checkpoints/explore-checkpoint.ipynb", "{}")
    w("tmp/scratch.txt", "half-finished thoughts\n")
    # data
    w("data/toddler.txt", "\n".join(f"the {a} {b}." for a in ("dog", "cat", "baby", "bird", "ball", "car")
                                    for b in ("runs", "sleeps", "eats", "jumps", "falls")) + "\n")
    w("data/stories.jsonl", "".join(json.dumps({"id": i, "story": f"once upon a time there was a bear number {i}. "
                                                "it liked honey very much."}) + "\n" for i in range(30)))
    w("data/childes/sample.cha", CHAT)
    # adapters: plain, inside a temp folder, inside a Trainer checkpoint, .bin, broken, other base
    _peft_adapter(tiny, root / "my_adapter", 1)
    _peft_adapter(tiny, root / "tmp" / "run3" / "final_adapter", 2)
    _peft_adapter(tiny, root / "outputs" / "checkpoint-20", 3)
    ck = root / "outputs" / "checkpoint-20"
    torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
    torch.save({"last_epoch": 20}, ck / "scheduler.pt")
    torch.save({"python": 1}, ck / "rng_state.pth")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": [
        {"step": 10, "loss": 2.5}, {"step": 20, "loss": 2.1}]}))
    model = _peft_adapter(tiny, root / "old_bin_adapter", 4)
    (root / "old_bin_adapter" / "adapter_model.safetensors").unlink()
    torch.save(get_peft_model_state_dict(model), root / "old_bin_adapter" / "adapter_model.bin")
    _peft_adapter(tiny, root / "broken_adapter", 5)
    f = root / "broken_adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])  # truncated
    _peft_adapter(other, root / "other_base_adapter", 6)
    # an MLflow file store with two runs, written by MLflow itself
    (root / "tmp_artifacts").mkdir()
    env = dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true")
    proc = subprocess.run([sys.executable, "-c", MLFLOW_SCRIPT, str(root / "mlruns"), str(root / "tmp_artifacts")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a symlink that points out of OLD_DIR: reported, never followed
    (root / "link_out").symlink_to(outside)


def all_files(folder: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        d = Path(dirpath)
        out |= {(d / n).relative_to(folder).as_posix() for n in filenames}
        out |= {(d / n).relative_to(folder).as_posix() for n in dirnames if (d / n).is_symlink()}
    return out


@pytest.fixture(scope="module")
def old_project(tmp_path_factory, tiny_model_dir, other_tiny_model_dir) -> Path:
    base = tmp_path_factory.mktemp("old")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("must never be read\n")
    build_old_project(base / "old_project", tiny_model_dir, other_tiny_model_dir, outside)
    return base / "old_project"


def _covered(items_files: list[list[str]]) -> list[str]:
    return [f for files in items_files for f in files]


def test_plan_classifies_every_file_once_and_changes_nothing(project, old_project):
    from lora_project.adopt.plan import make_plan

    before_old, before_proj = snapshot(old_project), snapshot(project)
    plan = make_plan(ProjectPaths(project.resolve()), old_project)
    covered = _covered([it.files for it in plan.items])
    assert sorted(covered) == sorted(all_files(old_project)), "every file exactly once"
    by_source = {it.source: it for it in plan.items}
    for src in GOOD_ADAPTERS:
        assert by_source[src].kind == "adapter" and by_source[src].action in ("copy", "convert"), by_source[src]
    assert by_source["old_bin_adapter/"].action == "convert"
    assert by_source["broken_adapter/"].action == "leave" and "broken" in by_source["broken_adapter/"].reason
    other = by_source["other_base_adapter/"]
    assert other.action == "copy" and "trained on base" in other.reason
    for pickle in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert by_source[f"outputs/checkpoint-20/{pickle}"].kind == "trainer-state"
        assert by_source[f"outputs/checkpoint-20/{pickle}"].action == "leave"
    assert by_source["data/toddler.txt"].info["row"]["format"] == "lines"
    assert by_source["data/stories.jsonl"].info["row"] == {"format": "jsonl", "text_field": "story", "options": "",
                                                           "kind": "local"}
    assert by_source["data/childes/*.cha"].kind == "chat"
    assert by_source["mlruns/"].kind == "mlflow" and by_source["mlruns/"].info["runs"] == 2
    assert by_source["notebooks/.ipynb_checkpoints/"].action == "leave"
    assert by_source["__pycache__/"].action == "leave"
    assert by_source["tmp/scratch.txt"].action == "leave"
    assert by_source["link_out"].kind == "link" and by_source["link_out"].action == "leave"
    script = by_source["scripts/extract_children_speaking.py"]
    assert "lora-project extract-children" in script.reason and "helpers" in script.reason
    assert "pylangacq_not_installed_xyz" in script.reason
    assert "lora-project train" in by_source["train_single_lora.py"].reason
    assert "helpers" not in by_source["train_single_lora.py"].info["unresolved"]  # copied beside it
    assert "lora.r" in by_source["config.yaml"].reason and "training.lr" in by_source["config.yaml"].reason
    assert by_source["config.yaml"].destination == "config/legacy/config.yaml"
    assert snapshot(old_project) == before_old and snapshot(project) == before_proj


def _tensors_of_original(folder: Path) -> dict:
    from safetensors.torch import load_file

    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    return torch.load(folder / "adapter_model.bin", weights_only=True)


def _ignored(rel: str) -> bool:
    """Git-ignored run outputs (the manifest, the MLflow database, prepared data)."""
    return rel.startswith(("outputs/", "mlruns/", "data/processed/")) and not rel.endswith(".gitkeep")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The real CLI entry point, in this process (conftest.run_cli: own output, state restored)."""
    proc = run_cli(*args)
    return proc.returncode, proc.stdout, proc.stderr


def test_adopt_apply_again_and_undo(project, tracking_store, old_project, tiny_model_dir, other_tiny_model_dir, capsys):
    from mlflow.tracking import MlflowClient
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from lora_project.adopt import adopt
    from lora_project.data.catalog import load_catalog
    from lora_project.data.dataset_loader import prepare_dataset
    from lora_project.models.lora_factors import list_adapters

    paths = ProjectPaths(project.resolve())
    for keep in ("adapters", "data/raw", "data/processed", "data/datasets", "mlruns", "outputs/logs", "scripts"):
        (project / keep).mkdir(parents=True, exist_ok=True)  # as in a checkout
        (project / keep / ".gitkeep").write_text("")
    before_old, before_proj, dirs_before = snapshot(old_project), snapshot(project), _dirs(project)
    rc, out, err = cli(capsys, "adopt", str(old_project), "--apply", "--json")
    assert rc == 0, err[-3000:]
    result = json.loads(out)
    assert set(result) == {"items", "totals", "manifest"}
    assert all(set(it) == {"source", "kind", "action", "destination", "reason"} for it in result["items"])
    assert result["totals"]["failed"] == 0, [it for it in result["items"] if it["action"] == "failed"]
    items = {it["source"]: it for it in result["items"]}

    # adapters: listed ok by inspect, identical tensors through plain PEFT, our metadata with unknowns
    rows = {r["name"]: r for r in list_adapters(project / "adapters")}
    for src in GOOD_ADAPTERS + ("other_base_adapter/",):
        dest = items[src]["destination"]
        row = rows[Path(dest).name]
        assert row["status"] == "ok", row
        meta = json.loads((project / dest / "lora_project.json").read_text())
        assert meta["origin"] == "adopted" and meta["dataset"] is None and "git_commit" in meta["unknown"]
        base_dir = other_tiny_model_dir if src == "other_base_adapter/" else tiny_model_dir
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(project / dest))
        loaded = get_peft_model_state_dict(model)
        original = _tensors_of_original(old_project / src)
        assert set(loaded) == set(original)
        assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert not any(it["destination"] for it in result["items"] if it["source"] == "broken_adapter/")
    ck_meta = json.loads((project / items["outputs/checkpoint-20/"]["destination"] / "lora_project.json").read_text())
    assert ck_meta["trainer_history"]["log_history"][-1] == {"step": 20, "loss": 2.1}
    other_meta = json.loads((project / items["other_base_adapter/"]["destination"] / "lora_project.json").read_text())
    assert other_meta["base_model"]["name"] == str(other_tiny_model_dir)
    assert other_meta["base_model"]["matches_configured_base"] is False and other_meta["base_model"]["fingerprint"]
    # evaluate runs with an adopted adapter on our base; the other base's adapter is refused, naming its base
    text = project / "eval.txt"
    text.write_text("the dog runs to the ball.\nmore cookie please.\n")
    rc, out, err = cli(capsys, "evaluate", "--text", str(text), "--adapter", items["my_adapter/"]["destination"],
                       "--adapter", items["old_bin_adapter/"]["destination"], "--json")
    assert rc == 0, err[-2000:]
    rc, out, err = cli(capsys, "evaluate", "--text", str(text), "--adapter",
                       items["other_base_adapter/"]["destination"])
    assert rc == 2 and str(other_tiny_model_dir) in err, err[-2000:]
    text.unlink()

    # data: one catalog row each, and prepare accepts them
    catalog = load_catalog(paths.catalog)
    added = result["totals"]["catalog_rows"]
    assert len(added) == 3
    for name in added:
        prep = prepare_dataset(paths, name, catalog=catalog, progress=False, log=lambda m: None)
        assert prep.folder.is_dir()
    assert catalog[Path(items["data/stories.jsonl"]["destination"]).stem].text_field == "story"
    assert catalog[Path(items["data/childes/*.cha"]["destination"].rstrip("/")).name].kind == "childes"

    # MLflow: both runs with their params, every metric step, tags and artifacts in the project's store
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toddler-lora")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"run0", "run1"}
    for i in (0, 1):
        r = runs[f"run{i}"]
        assert r.data.params == {"r": "8", "lr": str(0.001 * (i + 1)), "dataset": "toddler"}
        assert r.data.tags["note"] == f"old run {i}" and r.info.status == "FINISHED"
        hist = client.get_metric_history(r.info.run_id, "loss")
        assert [(m.step, m.value) for m in hist] == [(s * 10, 3.0 - 0.25 * s - i) for s in range(7)]
        art = Path(r.info.artifact_uri.removeprefix("file://"))
        assert (project / "mlruns") in art.parents
        assert (art / f"curve{i}.txt").read_text() == f"loss curve of run {i}\n"

    # the manifest accounts for every old file; OLD_DIR is byte-identical
    manifest = project / result["manifest"]
    data = json.loads(manifest.read_text())
    assert sorted(_covered([it["source_files"] for it in data["items"]])) == sorted(all_files(old_project))
    assert all(c["sha256"] for it in data["items"] for c in it["copies"])
    assert snapshot(old_project) == before_old

    # a second adoption adds nothing, and says so
    after_first = snapshot(project)
    again, text_out = adopt(paths, old_project, apply=True)
    assert again["manifest"] is None and "nothing new" in text_out
    assert not any(it["action"] in ("copy", "convert", "import") for it in again["items"])
    assert {k: v for k, v in snapshot(project).items() if not _ignored(k)} == \
        {k: v for k, v in after_first.items() if not _ignored(k)}
    assert len(client.search_runs([exp.experiment_id])) == 2

    # undo brings the tree back (ignored run outputs aside) and purges the runs
    rc, out, err = cli(capsys, "adopt", "--undo", result["manifest"], "--json")
    assert rc == 0, err[-3000:]
    undone = json.loads(out)
    assert undone["totals"]["mlflow_runs_removed"] == 2 and undone["totals"]["files_kept"] == 0
    now = {k: v for k, v in snapshot(project).items() if not _ignored(k)}
    assert now == {k: v for k, v in before_proj.items() if not _ignored(k)}
    assert _dirs(project) == dirs_before
    assert client.get_experiment_by_name("toddler-lora") is None
    assert not list(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert snapshot(old_project) == before_old
    rc, out, err = cli(capsys, "adopt", "--undo", result["manifest"])
    assert rc == 2 and "already undone" in err


def _dirs(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_dir() and not _ignored(p.relative_to(root).as_posix() + "/")}


def test_pickle_that_runs_code_is_refused_not_run(project, tmp_path, tiny_model_dir):
    """A .bin adapter whose pickle would run code: the restricted loader refuses it; nothing runs."""
    from lora_project.adopt import adopt

    old = tmp_path / "evil_old"
    _peft_adapter(tiny_model_dir, old / "evil", 7)
    (old / "evil" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.x.lora_A.weight": Evil(str(marker))}, old / "evil" / "adapter_model.bin")
    result, _ = adopt(ProjectPaths(project.resolve()), old, apply=True)
    item = next(it for it in result["items"] if it["source"] == "evil/")
    assert item["action"] == "failed" and "restricted loader" in item["reason"], item
    assert not marker.exists()
    assert not (project / "adapters" / "evil_lora").exists()


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unreadable_file_is_bad_input_and_changes_nothing(project, tmp_path, monkeypatch):
    """Unreadable files (root reads everything, so the refusal is simulated at the open call)."""
    import builtins

    from lora_project.adopt import adopt, classify
    from lora_project.errors import UserError

    old = tmp_path / "old"
    (old / "data").mkdir(parents=True)
    (old / "data" / "a.txt").write_text("hello there\n")
    real_open = builtins.open

    def fake_open(path, *a, **kw):
        if str(path).endswith("a.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(classify, "open", fake_open, raising=False)
    before = snapshot(project)
    with pytest.raises(UserError, match="cannot read .*a.txt: permission denied"):
        adopt(ProjectPaths(project.resolve()), old, apply=True)
    assert snapshot(project) == before


def test_catalog_add_list_remove(project, tmp_path, capsys):
    from lora_project.data.dataset_loader import prepare_dataset

    paths = ProjectPaths(project.resolve())
    src = tmp_path / "elsewhere"
    (src / "chat").mkdir(parents=True)
    (src / "notes.txt").write_text("the cat sat on the mat.\nthe dog ran home.\nbaby wants milk.\n")
    (src / "chat" / "s.cha").write_text(CHAT)
    (src / "tiny.csv").write_text("id,utterance\n1,the little bear went home\n2,the big bear stayed out\n")
    before_src = snapshot(src)
    catalog_before = paths.catalog.read_bytes()
    rc, out, err = cli(capsys, "catalog", "add", "notes", str(src / "notes.txt"), "--json")
    assert rc == 0, err
    out = json.loads(out)
    assert out["location"] == "data/raw/notes.txt" and out["row"]["format"] == "lines"
    rc, out, err = cli(capsys, "catalog", "add", "chat_kid", str(src / "chat"))
    assert rc == 0 and "childes" in out, err
    rc, out, err = cli(capsys, "catalog", "add", "bears", str(src / "tiny.csv"))
    assert rc == 0, err
    for name in ("notes", "chat_kid", "bears"):
        prepare_dataset(paths, name, progress=False, log=lambda m: None)
    rc, out, err = cli(capsys, "catalog", "list", "--json")
    listed = json.loads(out)["rows"]
    assert {"notes", "chat_kid", "bears"} <= {r["name"] for r in listed}
    assert next(r for r in listed if r["name"] == "bears")["text_field"] == "utterance"
    for name in ("notes", "chat_kid", "bears"):
        rc, out, err = cli(capsys, "catalog", "remove", name)
        assert rc == 0 and "no data file was deleted" in out, err
    assert paths.catalog.read_bytes() == catalog_before
    assert (project / "data" / "raw" / "notes.txt").is_file()  # remove keeps the copy
    assert snapshot(src) == before_src
