"""scripts/evaluation/babylm_official_check.py: the sample it writes, and `compare`'s verdict on
outputs in the official pipeline's formats (written here by hand: the official code is not part of
this repository)."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO

spec = importlib.util.spec_from_file_location("babylm_official_check",
                                              REPO / "scripts" / "evaluation" / "babylm_official_check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def _suite(root):
    blimp = root / "blimp_filtered"
    blimp.mkdir(parents=True)
    rows = [{"sentence_good": f"good {i}.", "sentence_bad": f"bad {i}.", "field": "syntax",
             "UID": "u1" if i < 3 else "u2"}
            for i in range(5)]
    (blimp / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    et = root / "entity_tracking"
    et.mkdir()
    for name, ops in (("regular", [0, 0, 1]), ("ambiref", [0])):
        (et / f"{name}.jsonl").write_text("\n".join(json.dumps(
            {"input_prefix": "Box 0 contains ", "options": [f"a{k}", f"b{k}"], "numops": n})
            for k, n in enumerate(ops)) + "\n")
    return rows


def _official(root, preds_blimp, preds_et):
    out = root / "official"
    (out / "blimp" / "blimp_filtered").mkdir(parents=True, exist_ok=True)
    (out / "blimp" / "blimp_filtered" / "predictions.json").write_text(json.dumps(
        {uid: {"predictions": [{"id": f"{uid}_{k}", "pred": p} for k, p in enumerate(v)]}
         for uid, v in preds_blimp.items()}))
    (out / "entity_tracking" / "entity_tracking").mkdir(parents=True, exist_ok=True)
    (out / "entity_tracking" / "entity_tracking" / "predictions.json").write_text(json.dumps(
        {uid: {"predictions": [{"id": f"{uid}_{k}", "pred": p} for k, p in enumerate(v)]}
         for uid, v in preds_et.items()}))
    return out


def test_compare_agrees_item_by_item_and_exits_1_on_one_differing_decision(tmp_path, capsys):
    data = tmp_path / "suite"
    _suite(data)
    # ours, items in sorted file order: u1 = good, bad, good; u2 = good, good; entity tracking: ambiref_0 wrong,
    # then regular_0 right, wrong and regular_1 right -> headline mean(mean(50, 100), mean(0)) = 37.5
    ours = {"models": {"base": {"tasks": {
        "blimp": {"decisions": "10111", "headline": (200 / 3 + 100) / 2, "near_ties": []},
        "entity_tracking": {"decisions": "0101", "headline": 37.5, "near_ties": []}}}}}
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    blimp = {"u1": ["good 0.", "bad 1.", "good 2."], "u2": ["good 3.", "good 4."]}
    et = {"regular_0_ops": ["a0", "b1"], "regular_1_ops": ["a2"], "ambiref_0_ops": ["b0"]}
    official = _official(tmp_path, blimp, et)
    assert check.compare(tmp_path / "ours.json", official, data) == 0
    out = capsys.readouterr().out
    assert "blimp: 5 items" in out and "entity_tracking: 4 items" in out and out.count("EQUAL") == 2
    assert "37.5000, official 37.5000" in out

    blimp["u2"][1] = "bad 4."  # the official side picks the other sentence once
    official = _official(tmp_path, blimp, et)
    assert check.compare(tmp_path / "ours.json", official, data) == 1
    assert "differing decisions 1 [('u2', 1)]" in capsys.readouterr().out


def test_sample_keeps_every_nth_line_per_file_and_reading_whole(tmp_path, monkeypatch):
    from lora_project.evaluation.babylm_tasks import FOLDERS

    src = tmp_path / "src"
    for folder in map(FOLDERS.get, check.EVERY):
        (src / folder).mkdir(parents=True)
        (src / folder / "f.jsonl").write_text("".join(f'{{"i": {i}}}\n' for i in range(25)) + "\n")
    (src / "reading").mkdir()
    (src / "reading" / "reading_data.csv").write_text("a,b\n1,2\n")
    monkeypatch.setattr(check, "EVERY", dict.fromkeys(check.EVERY, 10))
    check.sample(src, tmp_path / "dst")
    for folder in map(FOLDERS.get, check.EVERY):
        kept = [json.loads(line)["i"] for line in (tmp_path / "dst" / folder / "f.jsonl").read_text().splitlines()]
        assert kept == [0, 10, 20]
    assert (tmp_path / "dst" / "reading" / "reading_data.csv").read_text() == "a,b\n1,2\n"


def test_compare_fails_when_the_two_sides_did_not_score_the_same_items_or_nothing_was_compared(tmp_path, capsys):
    data = tmp_path / "suite"
    _suite(data)
    ours = {"models": {"base": {"tasks": {
        "blimp": {"decisions": "10111", "headline": (200 / 3 + 100) / 2, "near_ties": []},
        "entity_tracking": {"decisions": "0101", "headline": 37.5, "near_ties": []}}}}}
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    et = {"regular_0_ops": ["a0", "b1"], "regular_1_ops": ["a2"], "ambiref_0_ops": ["b0"]}
    # the official side scored extra (wrong) items of u2: not the same items, even though the common ones agree
    official = _official(tmp_path, {"u1": ["good 0.", "bad 1.", "good 2."], "u2": ["good 3.", "good 4.", "bad 9."]}, et)
    assert check.compare(tmp_path / "ours.json", official, data) == 1
    assert "blimp: 5 items" in capsys.readouterr().out
    # a mistyped official folder: every task present on our side only is NOT COMPARED, and that fails
    assert check.compare(tmp_path / "ours.json", tmp_path / "nope", data) == 1
    out = capsys.readouterr().out
    assert out.count("NOT COMPARED") == 2 and "nothing compared" in out


def test_sample_and_model_v4_never_write_into_a_folder_holding_other_files(tmp_path):
    import pytest

    src = tmp_path / "src"
    (src / "blimp_filtered").mkdir(parents=True)
    data = "".join(f'{{"i": {i}}}\n' for i in range(25))
    (src / "blimp_filtered" / "f.jsonl").write_text(data)
    with pytest.raises(SystemExit, match="not an empty folder"):
        check.sample(src, src)  # sampling into its own source would shrink the data
    assert (src / "blimp_filtered" / "f.jsonl").read_text() == data
    model = tmp_path / "my_model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="did not write"):
        check.model_v4(model)
    assert (model / "model.safetensors").read_bytes() == b"weights" and not (model / "model.safetensors").is_symlink()
