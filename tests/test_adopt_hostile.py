"""`adopt` under hostile use (issue 31, findings A1-A8): it never loses or deletes a user's file
and says when it did not finish.

Each test is the reproduction of one finding of the probe, run against the real CLI (in this
process, conftest.run_cli) on an old project written here: two adapters with identical content,
a data file, a script, and where needed an MLflow file store written by MLflow itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error, run_cli, snapshot
from test_adopt import MLFLOW_SCRIPT, _peft_adapter

from lora_project.paths import ProjectPaths


def small_old(root: Path, tiny: Path) -> Path:
    """a1/ and a2/: the same adapter twice (identical content); a data file; a script."""
    _peft_adapter(tiny, root / "a1", 1)
    shutil.copytree(root / "a1", root / "a2")
    (root / "data").mkdir()
    (root / "data" / "kids.txt").write_text("the dog runs.\nmore cookie.\nwhere ball?\n")
    (root / "train.py").write_text("print('old training')\n")
    return root


@pytest.fixture(scope="module")
def mlruns_template(tmp_path_factory) -> Path:
    """An MLflow file store with two runs and an artifact each, written once by MLflow itself."""
    base = tmp_path_factory.mktemp("mlruns")
    (base / "art").mkdir()
    env = dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true")
    proc = subprocess.run([sys.executable, "-c", MLFLOW_SCRIPT, str(base / "mlruns"), str(base / "art")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return base / "mlruns"


def _manifest(project: Path, out: str) -> Path:
    return project / json.loads(out)["manifest"]


def _adopt(old: Path, *extra: str):
    return run_cli("adopt", str(old), "--apply", "--json", *extra)


def _ledger_accepts(project: Path, manifest: Path) -> None:
    """Make the ledger vouch for the manifest's current bytes (an attacker who edits both)."""
    ledger = project / "outputs" / "adopt" / "ledger.json"
    if not ledger.exists():
        return  # (code from before the ledger: nothing vouches for manifests)
    data = json.loads(ledger.read_text())
    data["manifests"][manifest.name]["sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    ledger.write_text(json.dumps(data))


# --- A1: undo removes only what that adoption created --------------------------------------


def test_undo_refuses_an_edited_manifest_and_never_deletes_a_project_file(project, tmp_path, tiny_model_dir):
    old = small_old(tmp_path / "old", tiny_model_dir)
    catalog_before = (project / "config" / "dataset_catalog.csv").read_bytes()
    proc = _adopt(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = _manifest(project, proc.stdout)
    config = project / "config" / "training_config.yaml"
    data = json.loads(manifest.read_text())
    data["items"][0]["copies"].append({"source": "x", "destination": "config/training_config.yaml",
                                       "sha256": hashlib.sha256(config.read_bytes()).hexdigest()})
    data["catalog"]["rows"].append("toddler_data")
    manifest.write_text(json.dumps(data))
    before = snapshot(project)
    assert_user_error(run_cli("adopt", "--undo", str(manifest)), "changed after adopt wrote it")
    assert snapshot(project) == before
    # whoever also rewrites the ledger still cannot reach a file or a row that adopt did not add
    _ledger_accepts(project, manifest)
    assert_user_error(run_cli("adopt", "--undo", str(manifest)), "config/training_config.yaml",
                      "not where adopt puts files")
    unledgered = lambda snap: {k: v for k, v in snap.items() if not k.endswith("ledger.json")}  # noqa: E731
    assert config.is_file() and unledgered(snapshot(project)) == unledgered(before)
    data["items"][0]["copies"].pop()
    manifest.write_text(json.dumps(data))
    _ledger_accepts(project, manifest)
    proc = run_cli("adopt", "--undo", str(manifest), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "toddler_data" not in json.loads(proc.stdout)["totals"]["catalog_rows_removed"]
    assert (project / "config" / "dataset_catalog.csv").read_bytes() == catalog_before  # shipped rows kept


@pytest.mark.parametrize("field,value", [("copies", "zzz"), ("items", {"a": 1}), ("catalog", ["rows"]),
                                         ("mlflow.runs", [{"run_id": 5}]), ("created_dirs", "outputs")])
def test_a_manifest_with_wrong_field_types_is_one_line(field, value, project, tmp_path, tiny_model_dir):
    old = small_old(tmp_path / "old", tiny_model_dir)
    manifest = _manifest(project, _adopt(old).stdout)
    data = json.loads(manifest.read_text())
    if field == "copies":
        data["items"][0]["copies"] = value
    elif field == "mlflow.runs":
        data["mlflow"]["runs"] = value
    else:
        data[field] = value
    manifest.write_text(json.dumps(data))
    _ledger_accepts(project, manifest)
    before = snapshot(project)
    assert_user_error(run_cli("adopt", "--undo", str(manifest)), "not a valid adoption manifest")
    assert snapshot(project) == before


def test_a_manifest_adopt_did_not_write_is_refused(project, tmp_path, tiny_model_dir):
    old = small_old(tmp_path / "old", tiny_model_dir)
    manifest = _manifest(project, _adopt(old).stdout)
    forged = manifest.with_name("adopt_20200101-000000-000000.json")
    forged.write_bytes(manifest.read_bytes())
    assert_user_error(run_cli("adopt", "--undo", str(forged)), "not in the adopt ledger")
    assert (project / "adapters" / "a1_lora").is_dir()


# --- A3: identical items are matched by path and digest ---------------------------------------


def test_identical_items_are_matched_by_path_then_digest(project, tmp_path, tiny_model_dir, monkeypatch):
    """Ctrl-C after the first of two identical adapters; the re-run adopts the second one only."""
    from lora_project.adopt import apply

    old = small_old(tmp_path / "old", tiny_model_dir)
    real, calls = apply.adopt_adapter, []

    def stop_at_second(rec, it, dest):
        calls.append(it.source)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(rec, it, dest)

    monkeypatch.setattr(apply, "adopt_adapter", stop_at_second)
    first = _adopt(old)
    assert first.returncode == 130, first.stderr[-2000:]
    monkeypatch.setattr(apply, "adopt_adapter", real)
    again = _adopt(old)
    assert again.returncode == 0, again.stderr[-2000:]
    items = {it["source"]: it for it in json.loads(again.stdout)["items"]}
    assert items["a1/"]["action"] == "skip" and items["a1/"]["destination"] == "adapters/a1_lora"
    assert items["a2/"]["action"] == "copy" and items["a2/"]["destination"] == "adapters/a2_lora"
    assert sorted(p.name for p in (project / "adapters").iterdir() if p.is_dir()) == ["a1_lora", "a2_lora"]
    third = _adopt(old)
    assert third.returncode == 0 and json.loads(third.stdout)["manifest"] is None, third.stdout[-2000:]
    assert {it["action"] for it in json.loads(third.stdout)["items"]} <= {"skip", "leave"}


# --- A4: names that are not UTF-8 ---------------------------------------------------------------


def test_file_names_that_are_not_utf8_are_adopted_and_undone(project, tmp_path, tiny_model_dir):
    old = small_old(tmp_path / "old", tiny_model_dir)
    raw = os.fsencode(old)
    with open(raw + b"/data/caf\xe9.txt", "wb") as fh:
        fh.write(b"the cat naps.\nthe dog digs.\n")
    with open(raw + b"/\xff\xfe_tool.py", "wb") as fh:
        fh.write(b"print(1)\n")
    plan = run_cli("adopt", str(old))
    assert plan.returncode == 0 and "Traceback" not in plan.stderr, plan.stderr[-2000:]
    assert "caf\\xe9.txt" in plan.stdout
    proc = _adopt(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["totals"]["failed"] == 0
    assert (project / "data" / "raw" / "caf.txt").read_bytes() == b"the cat naps.\nthe dog digs.\n"
    assert (Path(os.fsdecode(os.fsencode(project) + b"/scripts/legacy/\xff\xfe_tool.py"))).is_file()
    undo = run_cli("adopt", "--undo", result["manifest"])
    assert undo.returncode == 0, undo.stderr[-2000:]
    assert not (project / "data" / "raw" / "caf.txt").exists()


# --- A5: one adoption at a time -------------------------------------------------------------------


def test_a_second_adoption_while_one_runs_is_refused(project, tmp_path, tiny_model_dir):
    """The running one is stood in for by a real flock on the project's adopt lock file."""
    old = small_old(tmp_path / "old", tiny_model_dir)
    lock = project / "outputs" / "adopt" / ".adopt.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    before = snapshot(project)
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("4242")
        fh.flush()
        assert_user_error(_adopt(old), "another adoption or undo is running", "pid 4242")
        assert not (project / "adapters" / "a1_lora").exists()
        assert not list((project / "outputs" / "adopt").glob("adopt_*.json"))
    proc = _adopt(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_user_error(run_cli("adopt", "--undo", json.loads(proc.stdout)["manifest"]), "another adoption")
    assert (project / "adapters" / "a1_lora").is_dir()
    assert set(before) <= set(snapshot(project))


# --- A6, A7: which base an adopted adapter needs -------------------------------------------------


def _set_base(folder: Path, base) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_an_adapter_trained_on_the_embedded_cache_folder_is_on_the_embedded_base(project, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_project.models.base_model import embedded_fingerprint
    from lora_project.models.lora_model import attach_adapters

    fp = embedded_fingerprint()
    old = tmp_path / "old"
    _peft_adapter(tiny_model_dir, old / "kid", 1)
    _set_base(old / "kid", f"/home/someone/.cache/lora-project/models/{fp[:16]}")  # the cache folder elsewhere
    (project / "config" / "model_config.yaml").write_text("model:\n  source: embedded\n")
    proc = _adopt(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    item = json.loads(proc.stdout)["items"][0]
    assert "trained on base" not in item["reason"], item
    meta = json.loads((project / "adapters" / "kid_lora" / "lora_project.json").read_text())
    assert meta["base_model"]["matches_configured_base"] is True
    assert meta["base_model"]["fingerprint"] == fp and meta["base_model"]["name"] == "embedded"
    # what evaluate checks: the loaded embedded base (its fingerprint) accepts the adapter
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    attach_adapters(model, [project / "adapters" / "kid_lora"], fp, "embedded")
    # an adapter adopted before this fix (its metadata names the cache folder with that folder's
    # own weights hash) is recognised too
    meta["base_model"].update(name=f"/elsewhere/models/{fp[:16]}", fingerprint="0" * 64)
    (project / "adapters" / "kid_lora" / "lora_project.json").write_text(json.dumps(meta))
    attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [project / "adapters" / "kid_lora"], fp,
                    "embedded")


def test_an_adapter_without_a_recorded_base_is_not_said_to_match(project, tmp_path, tiny_model_dir):
    old = tmp_path / "old"
    _peft_adapter(tiny_model_dir, old / "nobase", 1)
    _set_base(old / "nobase", None)
    plan = run_cli("adopt", str(old), "--json")
    item = json.loads(plan.stdout)["items"][0]
    assert "no base model recorded" in item["reason"], item
    text = run_cli("adopt", str(old)).stdout
    assert "needs your attention" in text and "no base model recorded" in text
    proc = _adopt(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((project / "adapters" / "nobase_lora" / "lora_project.json").read_text())
    assert meta["base_model"]["matches_configured_base"] is None and meta["base_model"]["name"] is None


# --- A2 (the plan part), A8: MLflow stores -------------------------------------------------------


def _old_with_store(tmp_path: Path, template: Path, tiny: Path) -> Path:
    old = small_old(tmp_path / "old", tiny)
    shutil.copytree(template, old / "mlruns", symlinks=True)
    return old


def _experiment_dir(store: Path) -> Path:
    return next(p for p in store.iterdir() if p.name.isdigit() and p.name != "0")


@pytest.mark.parametrize("damage", [pytest.param("experiment meta.yaml not YAML", marks=pytest.mark.slow),
                                    "run meta.yaml a string",  # the others cost ~7 s each: slow tier
                                    pytest.param("metric file garbled", marks=pytest.mark.slow)])
def test_a_store_mlflow_cannot_read_is_found_by_the_plan(damage, project, tracking_store, tmp_path, mlruns_template,
                                                          tiny_model_dir):
    old = _old_with_store(tmp_path, mlruns_template, tiny_model_dir)
    exp = _experiment_dir(old / "mlruns")
    run = next(p for p in exp.iterdir() if p.is_dir())
    if damage.startswith("experiment"):
        (exp / "meta.yaml").write_text("name: [unclosed\n")
    elif damage.startswith("run"):
        (run / "meta.yaml").write_text("zzz\n")
    else:
        (run / "metrics" / "loss").write_text("not a metric line\n")
    proc = _adopt(old)  # its items are the plan's: the store is left in place, the rest adopted
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    item = next(it for it in json.loads(proc.stdout)["items"] if it["source"] == "mlruns/")
    assert item["action"] == "leave" and "MLflow" in item["reason"] and "not imported" in item["reason"], item
    manifest = json.loads(_manifest(project, proc.stdout).read_text())
    assert manifest["complete"] is True and manifest["mlflow"]["runs"] == []
    assert (project / "adapters" / "a2_lora").is_dir()
    # once the store is repaired, adopting again imports it and adds nothing else
    shutil.rmtree(old / "mlruns")
    shutil.copytree(mlruns_template, old / "mlruns")
    again = _adopt(old)
    assert again.returncode == 0, again.stderr[-2000:]
    done = [it for it in json.loads(again.stdout)["items"] if it["action"] in ("copy", "convert", "import")]
    assert [it["source"] for it in done] == ["mlruns/"]
    assert len(json.loads(_manifest(project, again.stdout).read_text())["mlflow"]["runs"]) == 2


def test_a_symlink_out_of_the_old_folder_in_mlflow_artifacts_is_reported(project, tmp_path, mlruns_template,
                                                                        tiny_model_dir):
    old = _old_with_store(tmp_path, mlruns_template, tiny_model_dir)
    secret = tmp_path / "secret.txt"
    secret.write_text("never read\n")
    run = next(p for p in _experiment_dir(old / "mlruns").iterdir() if p.is_dir())
    (run / "artifacts" / "leak.txt").symlink_to(secret)
    from lora_project.adopt.plan import format_plan, make_plan

    plan = make_plan(ProjectPaths(project.resolve()), old)
    items = {it.source: it for it in plan.items}
    rel = (run / "artifacts" / "leak.txt").relative_to(old).as_posix()
    assert items[rel].kind == "link" and items[rel].action == "leave", items.get(rel)
    assert "out of the old folder" in items[rel].reason
    text = format_plan(plan)
    assert f"{rel}: symbolic link out of the old folder" in text.split("needs your attention:")[1]
    assert [f for it in plan.items for f in it.files].count(rel) == 1
    assert items["mlruns/"].action == "import" and rel not in items["mlruns/"].files
