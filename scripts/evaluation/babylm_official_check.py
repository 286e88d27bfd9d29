"""Check `evaluate --babylm` against the official BabyLM 2025 pipeline run on the same model and items.

The official scoring code (babylm/evaluation-pipeline-2025; the mirror ../shared/data/README.md names,
`evaluation_pipeline/`) is run by you, in a scratch folder outside this repository, with its own
pinned requirements (transformers 4.51). This script does the rest, in three steps:

    python scripts/evaluation/babylm_official_check.py sample ../shared/data/babylm_2025 SAMPLE
    python scripts/evaluation/babylm_official_check.py model-v4 MODEL4
    #   official, in its folder: python -m evaluation_pipeline.sentence_zero_shot.run --backend causal
    #   --model_path_or_name MODEL4 --task blimp|ewok|wug|entity_tracking --data_path SAMPLE/<task folder>
    #   --save_predictions, and python -m evaluation_pipeline.reading.run --backend causal ...
    lora-project evaluate --babylm SAMPLE --json > ours.json
    python scripts/evaluation/babylm_official_check.py compare ours.json OFFICIAL/results/model4/main/zero_shot/causal SAMPLE

`sample` keeps every N-th line of each task file (deterministic; reading is copied whole, since its
regressions need every row). `model-v4` writes the embedded model as a folder transformers 4.51 reads
(`rope_theta` where transformers 5 writes `rope_parameters`, a fast-tokenizer class it knows; the
weights are linked, not copied). `compare` prints, per task, both headlines and the items whose
decisions differ (BLiMP, supplement, EWoK, wug, entity tracking: the official predictions are the
chosen completions, in file order per UID), and for reading both scores unrounded and the largest
word-surprisal difference. Exit code 1 when a decision or a headline differs (a reading score by
1e-4 or more), when the two sides did not score the same items, or when a task could not be compared,
so the check can gate a release. `sample` and `model-v4` write only into a new (or empty) folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

EVERY = {"blimp": 250, "supplement": 60, "ewok": 50, "entity_tracking": 400, "wug": 10}  # every N-th item
# our task name -> the official pipeline's --task (the data folders are babylm_tasks.FOLDERS)
OFFICIAL_TASK = {"blimp": "blimp", "supplement": "blimp", "ewok": "ewok", "wug": "wug",
                 "entity_tracking": "entity_tracking"}


def sample(src: Path, dst: Path) -> None:
    from lora_project.evaluation.babylm_tasks import FOLDERS

    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        sys.exit(f"error: {dst} exists and is not an empty folder: give a new one (a sample never "
                 "overwrites files, so it cannot shrink the data it samples or keep stale ones)")
    for task, every in EVERY.items():
        folder = FOLDERS[task]
        (dst / folder).mkdir(parents=True, exist_ok=True)
        kept = 0
        for f in sorted((src / folder).glob("*.jsonl")):
            lines = [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            keep = lines[::every]
            (dst / folder / f.name).write_text("\n".join(keep) + "\n", encoding="utf-8")
            kept += len(keep)
        print(f"{folder}: {kept} items (every {every}th line)")
    (dst / "reading").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "reading" / "reading_data.csv", dst / "reading" / "reading_data.csv")
    print("reading: every row")


def model_v4(dst: Path) -> None:
    from lora_project.models.base_model import resolve_model

    ours = {"config.json", "tokenizer_config.json", "tokenizer.json", "model.safetensors"}
    if dst.exists() and (not dst.is_dir() or not {p.name for p in dst.iterdir()} <= ours
                         or ((dst / "model.safetensors").exists() and not (dst / "model.safetensors").is_symlink())):
        sys.exit(f"error: {dst} holds files this command did not write: give a new folder (it never "
                 "overwrites a model)")
    src = resolve_model("embedded").directory.resolve()  # the embedded GGUF converted once to safetensors
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    for key in ("backend", "is_local"):
        tok.pop(key, None)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok["model_max_length"] = config.get("max_position_embeddings", 8192)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    link = dst / "model.safetensors"
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(src / "model.safetensors")
    print(f"wrote {dst} (weights linked from {src})")


def _reading_score(rec: dict) -> float:
    base = rec["R2"] - rec["Change in R2 from baseline"]
    return rec["Change in R2 from baseline"] / (1 - base) * 100


def compare(ours_json: Path, official: Path, data: Path) -> int:
    from lora_project.evaluation.babylm_tasks import ENTITY_FILES, FOLDERS, load_task

    ours = json.loads(ours_json.read_text())["models"]["base"]["tasks"]
    bad = compared = 0
    for task, otask in OFFICIAL_TASK.items():
        folder = FOLDERS[task]
        pred_file = official / otask / folder / "predictions.json"
        if task not in ours and not pred_file.exists():
            print(f"{task}: in neither run")
            continue
        if task not in ours or not pred_file.exists():
            print(f"{task}: NOT COMPARED (ours {'present' if task in ours else 'absent'}, "
                  f"official {'present' if pred_file.exists() else 'absent: ' + str(pred_file)})")
            bad += 1
            continue
        # the items as evaluate --babylm reads them, in its order (its decisions string's), the right option first
        items = [(it.uid, it.completions[0]) for it in load_task(data, task, warn=lambda m: None) or []]
        decisions = ours[task]["decisions"]
        if len(decisions) != len(items):
            print(f"{task}: ours scored {len(decisions)} items, the data holds {len(items)}: not the same run")
            bad += 1
            continue
        compared += 1
        mine, firsts = defaultdict(list), defaultdict(list)
        for (uid, first), d in zip(items, decisions):
            mine[uid].append(d == "1")
            firsts[uid].append(first)
        official_preds = {uid: v["predictions"] for uid, v in json.loads(pred_file.read_text()).items()}
        theirs = {uid: [p["pred"] == first for p, first in zip(v, firsts[uid])] for uid, v in official_preds.items()}
        differ = [(uid, k) for uid in mine for k, (a, b) in enumerate(zip(mine[uid], theirs.get(uid, []))) if a != b]
        # the same UIDs with the same item counts on both sides (zip above stops at the shorter)
        sizes = set(mine) == set(official_preds) and all(len(mine[u]) == len(official_preds[u]) for u in mine)
        acc = {u: 100 * sum(v) / len(v) for u, v in theirs.items()}
        if task == "entity_tracking":
            files = [[a for u, a in acc.items() if u.startswith(f)] for f in ENTITY_FILES]
            headline = sum(sum(f) / len(f) for f in files if f) / sum(1 for f in files if f)
        else:
            headline = sum(acc.values()) / len(acc)
        same = not differ and sizes and abs(headline - ours[task]["headline"]) < 1e-9
        bad += not same
        print(f"{task}: {len(items)} items; headline ours {ours[task]['headline']:.4f}, official {headline:.4f}; "
              f"differing decisions {len(differ)}{' ' + str(differ[:10]) if differ else ''}; "
              f"near-ties ours {len(ours[task].get('near_ties', []))}; {'EQUAL' if same else 'DIFFERENT'}")
    reading = official / "reading"
    if "reading" not in ours and not (reading / "predictive_power.jsonl").exists():
        print("reading: in neither run")
    elif "reading" not in ours or not (reading / "predictive_power.jsonl").exists():
        print(f"reading: NOT COMPARED (ours {'present' if 'reading' in ours else 'absent'}, official "
              f"{'present' if (reading / 'predictive_power.jsonl').exists() else 'absent: ' + str(reading)})")
        bad += 1
    else:
        compared += 1
        pp = [json.loads(line) for line in (reading / "predictive_power.jsonl").read_text().splitlines() if line]
        sp = [json.loads(line) for line in (reading / "predictive_power_spillover.jsonl").read_text().splitlines()
              if line]
        rt = [_reading_score(r) for r in pp if "RT" in r["Predicted variable"]]
        eye = sum(rt) / len(rt)
        spr = next(_reading_score(r) for r in sp if "self" in r["Predicted variable"])
        h = ours["reading"]["headline"]
        pred = [json.loads(line) for line in (reading / "prediction.jsonl").read_text().splitlines() if line]
        gap = max(abs(p["Logprob"] - s) for p, s in zip(pred, ours["reading"]["surprisal"]))
        ok = (abs(eye - h["eye_tracking"]) < 1e-4 and abs(spr - h["self_paced_reading"]) < 1e-4
              and len(pred) == len(ours["reading"]["surprisal"]))  # the same rows on both sides
        bad += not ok
        print(f"reading: eye-tracking ours {h['eye_tracking']:.7f}, official {eye:.7f}; self-paced ours "
              f"{h['self_paced_reading']:.7f}, official {spr:.7f}; largest word-surprisal difference {gap:.2e} nats; "
              f"{'EQUAL within 1e-4' if ok else 'DIFFERENT'}")
    if not compared:
        print("nothing compared: check the paths")
    return 1 if bad or not compared else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="every N-th line of each task file into a new suite folder")
    s.add_argument("src", type=Path)
    s.add_argument("dst", type=Path)
    m = sub.add_parser("model-v4", help="the embedded model as a folder transformers 4.51 reads")
    m.add_argument("dst", type=Path)
    c = sub.add_parser("compare", help="ours (evaluate --babylm --json) against the official results folder")
    c.add_argument("ours", type=Path)
    c.add_argument("official", type=Path, help=".../results/<model>/main/zero_shot/causal")
    c.add_argument("data", type=Path, help="the suite folder both sides scored")
    args = ap.parse_args()
    if args.cmd == "sample":
        sample(args.src, args.dst)
    elif args.cmd == "model-v4":
        model_v4(args.dst)
    else:
        sys.exit(compare(args.ours, args.official, args.data))


if __name__ == "__main__":
    main()
