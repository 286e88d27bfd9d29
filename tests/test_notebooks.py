"""The three notebooks run headless (nbclient, a real Jupyter kernel) on artefacts this test
creates: two small adapters trained with MLflow, a minimal-pairs result and prepared data;
and on an empty project, where they must explain what is missing instead of failing."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_cli

from lora_project.utils.notebooks import outputs_of, run_notebook

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _run_all(project, monkeypatch) -> dict[str, list[dict]]:
    monkeypatch.setenv("LORA_PROJECT_ROOT", str(project))  # the kernel inherits it
    out = {}
    for nb in NOTEBOOKS:
        executed = run_notebook(nb, project / "outputs" / "notebooks", project, timeout=600)
        outs = outputs_of(executed)
        assert not [o for o in outs if o.get("output_type") == "error"], nb.name
        out[nb.stem] = outs
    return out


def _text(outs: list[dict]) -> str:
    parts = []
    for o in outs:
        parts.append(o.get("text", ""))
        parts.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(outs: list[dict]) -> int:
    return sum(1 for o in outs if "image/png" in o.get("data", {}))


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert [nb.name for nb in NOTEBOOKS] == ["01_exploration.ipynb", "02_training_analysis.ipynb",
                                            "03_results_visualization.ipynb"]
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(str(nb_path), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, nb_path.name
                assert "def " not in cell.source, f"{nb_path.name}: logic belongs in lora_project.notebook_tables"


@pytest.mark.slow
def test_notebooks_on_an_empty_project_say_what_to_run(project, monkeypatch):
    outs = _run_all(project, monkeypatch)
    for name, o in outs.items():
        assert "nothing to show yet" in _text(o), name
    assert "lora-project prepare" in _text(outs["01_exploration"])
    assert "train" in _text(outs["02_training_analysis"])


@pytest.mark.slow
def test_notebooks_on_trained_adapters_show_tables_and_plots(project, tracking_store, monkeypatch):
    for name in ("toddler_data", "kids"):
        proc = run_cli("train", name, "--no-progress", cwd=project)
        assert proc.returncode == 0, proc.stderr[-2000:]
    pairs = project / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"sentence_good": g, "sentence_bad": b, "UID": u}) + "\n" for g, b, u in [
        ("the dog runs .", "the dog run .", "agreement"), ("the cat sleeps .", "the cat sleep .", "agreement"),
        ("where ball ?", "ball where ?", "order")]))
    proc = run_cli("evaluate", "--pairs", str(pairs), "--adapter", "adapters/toddler_data_lora",
                   "--adapter", "adapters/kids_lora", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = _run_all(project, monkeypatch)
    explore, training, results = outs["01_exploration"], outs["02_training_analysis"], outs["03_results_visualization"]
    assert _images(explore) >= 3  # split sizes, lengths, vocabulary overlap
    assert "toddler_data" in _text(explore) and "kids" in _text(explore)
    assert _images(training) >= 1 and "toddler_data" in _text(training) and "kids" in _text(training)
    assert _images(results) >= 4  # matrix, pairs, one weight figure per adapter
    text = _text(results)
    assert "macro average" in text and "kids_lora" in text
