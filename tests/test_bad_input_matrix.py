"""The bad-input matrix: every command fed each class of bad input.

Each case sets up a fresh project, runs the real CLI entry point (`main([...])`, in this
process with its own cwd, environment and captured output: see conftest.run_cli), and requires exit
code 2, exactly one `error:` line naming the problem (short, even for huge input), no
traceback, and every file that existed before the command byte-for-byte unchanged.
docs/research_notes.md lists every case id (a test below keeps the two in sync).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import REPO, assert_user_error, run_cli, snapshot

MAX_ERROR_CHARS = 600


@dataclass
class Case:
    id: str
    what: str                      # the bad input, in words (also the research-notes table)
    args: list[str]
    fragments: list[str]
    setup: Callable[[Path, Path], None] | None = None   # (project, adapters_src) -> None


def write(rel: str, data: bytes | str):
    def setup(project: Path, _src: Path) -> None:
        p = project / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return setup


def outside(name: str, data: bytes | str):
    """A file beside the project folder (adopt and catalog add take paths outside it)."""
    def setup(project: Path, _src: Path) -> None:
        (project.parent / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return setup


def catalog_rows(*rows: str):
    def setup(project: Path, _src: Path) -> None:
        path = project / "config" / "dataset_catalog.csv"
        head = path.read_text().splitlines()[0]
        path.write_text("\n".join([head, *rows]) + "\n")
    return setup


def with_adapter(name: str, damage: Callable[[Path], None] | None = None, source: str = "good_lora"):
    def setup(project: Path, src: Path) -> None:
        dst = project / "adapters" / name
        shutil.copytree(src / source, dst)
        if damage:
            damage(dst)
    return setup


def _truncate(folder: Path) -> None:
    f = folder / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _pickle_instead(folder: Path) -> None:
    import torch

    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, folder / "adapter_model.bin")  # a pickle: must never be loaded


def _other_base_shapes(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    tensors = {k: (v.new_zeros((v.shape[0], v.shape[1] * 2)) if "lora_A" in k else v)
               for k, v in load_file(f).items()}
    save_file(tensors, f)


def _bad_config_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{ not json")


def _json_file(rel: str, obj):
    import json

    def damage(folder: Path) -> None:
        (folder / rel).write_text(json.dumps(obj))
    return damage


def _config_field(**fields):
    import json

    def damage(folder: Path) -> None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    return damage


def _nan_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, f)


def _symlink_out(project: Path, _src: Path) -> None:
    catalog_rows("d,local,data/raw/d,,,,,,,,true")(project, _src)
    folder = project / "data" / "raw" / "d"
    folder.mkdir(parents=True)
    (folder / "ok.txt").write_text("a line of text\nanother line\n")
    (project.parent / "private.txt").write_text("someone else's file\n")
    (folder / "link.txt").symlink_to(project.parent / "private.txt")


_BOMB = "\n".join(["x: &a [1,1,1,1,1,1,1,1,1]"] + [
    f"l{i}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(6)])
EVAL_TEXT = ["evaluate", "--text", "config/dataset_catalog.csv", "--adapter"]


HUGE_LINE = "x" * 3_000_000  # one 3 MB line: the error must not echo it


def _base_weights_inside(folder: Path) -> None:
    """An adapter file that also carries a weight of the base itself (as an lm_head adapter's embedding copy)."""
    from safetensors.torch import load_file, save_file

    f = folder / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors["base_model.model.lm_head.weight"] = next(iter(tensors.values())).new_zeros((4, 4))
    save_file(tensors, f)


_PAIR = '{"sentence_good": "a .", "sentence_bad": "b ."}\n'
_CHAT = "@UTF8\n@Begin\n@Participants:\tCHI Target_Child\n*CHI:\tmore cookie .\n@End\n"
_TWO = lambda p, s: (with_adapter("good_lora")(p, s), with_adapter("r2_lora", source="r2_lora")(p, s))  # noqa: E731

# Issue 31: the newer commands (profile, sweep, ui, demo, inspect adapters/compare, catalog list),
# numeric ranges (checked by the parser), adapters that would change the shared base, one-line advice.
ROUND_THREE = [
    Case("demo-bad-set", "demo with a negative learning rate", ["demo", "--set", "training.lr=-1"],
         ["training.lr", "range above 0 to 1"]),
    Case("demo-seed-overflow", "demo with a seed above 2^63-1", ["demo", "--set", f"training.seed={2**63}"],
         ["training.seed", "range 0 to 9223372036854775807"]),
    Case("profile-no-source", "profile without a source", ["profile"], ["exactly one source"]),
    Case("profile-chat-not-chat", "profile --chat on a file that is not CHAT", ["profile", "--chat", "n.txt"],
         ["n.txt", "not a CHAT transcript"], write("n.txt", "just a line\nanother\n")),
    Case("profile-chat-encoding", "profile --chat with an unknown encoding", ["profile", "--chat", "t.cha",
         "--encoding", "klingon"], ["--encoding 'klingon'", "unknown encoding"], write("t.cha", _CHAT)),
    Case("profile-negative-samples", "profile --samples -5", ["profile", "--text", "n.txt", "--samples", "-5"],
         ["--samples", "from 1 to 100000"]),
    Case("profile-seed-overflow", "profile --seed 2^64", ["profile", "--text", "n.txt", "--seed", str(2**64)],
         ["--seed", "from 0 to 2^63-1"]),
    Case("profile-zero-temperature", "profile --temperature 0 (sampling needs > 0)",
         ["profile", "--text", "n.txt", "--temperature", "0"], ["--temperature", "above 0"]),
    Case("sweep-no-param", "sweep without --param", ["sweep", "toddler_data"], ["--param"]),
    Case("sweep-bad-param", "sweep --param with a value of the wrong type", ["sweep", "toddler_data", "--param",
         "lora.r=abc"], ["lora.r", "expected an integer"]),
    Case("sweep-negative-keep-best", "sweep --keep-best -1", ["sweep", "toddler_data", "--param", "lora.r=2,4",
         "--keep-best", "-1"], ["--keep-best", "from 1 to"]),
    Case("sweep-zero-trials", "sweep --trials 0", ["sweep", "toddler_data", "--param", "lora.r=2,4", "--trials", "0"],
         ["--trials", "from 1 to"]),
    Case("ui-port-range", "ui --port 70000", ["ui", "--port", "70000"], ["--port", "from 1 to 65535"]),
    Case("ui-port-text", "ui --port http", ["ui", "--port", "http"], ["--port", "is not an integer"]),
    Case("ui-bad-host", "ui --host 999.1.1.1 (blamed the port)", ["ui", "--host", "999.1.1.1", "--port", "7873"],
         ["--host 999.1.1.1"]),
    Case("inspect-adapters-sort", "inspect adapters --sort by an unknown column", ["inspect", "adapters", "--sort",
         "nonsense"], ["--sort", "unknown column"], with_adapter("good_lora")),
    Case("inspect-compare-missing", "inspect compare with a missing adapter", ["inspect", "compare",
         "adapters/good_lora", "adapters/none_lora"], ["adapter folder not found"], with_adapter("good_lora")),
    Case("inspect-compare-zero-rank", "inspect compare --max-rank 0", ["inspect", "compare", "adapters/good_lora",
         "adapters/r2_lora", "--max-rank", "0"], ["--max-rank", "from 1 to 4096"], _TWO),
    Case("inspect-values-zero-rows", "inspect values --rows 0", ["inspect", "values", "adapters/good_lora",
         "--module", "*q_proj", "--rows", "0"], ["--rows", "from 1 to"], with_adapter("good_lora")),
    Case("inspect-weights-huge-top-k", "inspect weights --top-k 10^6", ["inspect", "weights", "adapters/good_lora",
         "--top-k", "1000000"], ["--top-k", "from 1 to 4096"], with_adapter("good_lora")),
    Case("catalog-list-binary", "catalog list of a binary catalog", ["catalog", "list"], ["binary"],
         write("config/dataset_catalog.csv", b"\x00PK\x03\x04")),
    Case("train-seeds-overflow", "train --seeds with a seed above 2^63-1", ["train", "toddler_data", "--seeds",
         f"1,{2**63}"], ["--seeds", "2^63-1"]),
    Case("train-seeds-negative", "train --seeds -3", ["train", "toddler_data", "--seeds", "-3"],
         ["--seeds", "from 1 to 100"]),
    Case("train-head-target", "lm_head (tied to the embedding) as a LoRA target", ["train", "toddler_data",
         "--no-mlflow", "--set", "lora.target_modules=[q_proj,lm_head]"], ["lm_head", "output layer"]),
    Case("cfg-epochs-huge", "training.epochs beyond its range", ["train", "toddler_data", "--set",
         "training.epochs=1e9"], ["training.epochs", "range above 0 to 100000"]),
    Case("batch-fused-keep-best", "train-batch --fused with keep_best (checked before the model loads)",
         ["train-batch", "toddler_data", "kids", "--fused"], ["kids", "keep_best"],
         write("config/batch_config.yaml", "datasets:\n  kids:\n    training: {keep_best: true, eval_interval: 2}\n")),
    Case("adapter-base-weights", "an adapter file carrying a weight of the base (would change it for all)",
         EVAL_TEXT + ["adapters/good_lora", "--adapter", "adapters/w_lora"], ["w_lora", "weights of the base model"],
         lambda p, s: (with_adapter("good_lora")(p, s), with_adapter("w_lora", _base_weights_inside)(p, s))),
    Case("eval-pairs-all-bad", "a pairs file whose every line is bad (two lines before)", ["evaluate", "--pairs",
         "p.jsonl"], ["no usable minimal pairs", "line 2"], write("p.jsonl", '{"x": 1}\nnot json\n')),
    Case("eval-negative-max-tokens", "evaluate --max-tokens -1", ["evaluate", "--dataset", "kids", "--max-tokens",
         "-1"], ["--max-tokens", "from 0"]),
    Case("gen-seed-overflow", "generate --seed 2^64", ["generate", "--prompt", "hi", "--seed", str(2**64)],
         ["--seed", "2^63-1"]),
    Case("gen-data-seed-overflow", "generate-data --seed 2^64", ["generate-data", "--kind", "kids", "--seed",
         str(2**64)], ["--seed", "2^63-1"]),
    Case("bench-negative-matrix-tokens", "benchmark --matrix-max-tokens -1", ["benchmark", "--matrix",
         "--matrix-max-tokens", "-1"], ["--matrix-max-tokens", "from 0"]),
    Case("merge-density-above-one", "merge --density 1.5", ["merge", "adapters/good_lora", "adapters/r2_lora",
         "--name", "m", "--method", "ties", "--density", "1.5"], ["--density", "at most 1"], _TWO),
    Case("prepare-catalog-encoding-advice", "a latin-1 JSON-lines row: advice names the row's option",
         ["prepare", "lat", "--no-tokens"], ["encoding=ENCODING in the row's options"],
         lambda p, s: (catalog_rows("lat,local,data/raw/lat.jsonl,,,,,,,,true")(p, s),
                       write("data/raw/lat.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))(p, s))),
]

CASES = [
    # --- configuration files and overrides
    Case("cfg-missing", "config file that does not exist", ["train", "toddler_data", "--config", "nope.yaml"],
         ["config file not found"]),
    Case("cfg-is-folder", "--config names a folder", ["train", "toddler_data", "--config", "config"],
         ["config is a folder, not a YAML file"]),
    Case("grammar-is-folder", "--grammar names a folder", ["generate-data", "--grammar", "config", "--out",
                                                           "data/raw/g.txt"],
         ["config is a folder, not a YAML file"]),
    Case("extract-no-sep", "--format separator without --sep",
         ["extract", "config/dataset_catalog.csv", "--format", "separator", "--out", "data/raw/s.txt"],
         ["--sep"]),
    Case("cfg-empty-model", "empty model config", ["train", "toddler_data", "--model-config", "empty.yaml",
                                                   "--set", "model.source=missing_dir"],
         ["missing_dir"], write("empty.yaml", "")),
    Case("cfg-malformed", "YAML syntax error", ["train", "toddler_data", "--config", "bad.yaml"],
         ["bad.yaml", "line"], write("bad.yaml", "training:\n  lr: [1, 2\n  seed: 3\n")),
    Case("cfg-binary", "binary file as config", ["train", "toddler_data", "--config", "bin.yaml"],
         ["binary"], write("bin.yaml", b"\x00\x01\x02\xff")),
    Case("cfg-non-utf8", "config not UTF-8", ["train", "toddler_data", "--config", "latin.yaml"],
         ["UTF-8"], write("latin.yaml", "training:\n  experiment: caf\xe9\n".encode("latin-1"))),
    Case("cfg-not-mapping", "YAML list instead of mapping", ["train", "toddler_data", "--config", "list.yaml"],
         ["mapping"], write("list.yaml", "- 1\n- 2\n")),
    Case("cfg-unknown-key", "unknown key with a typo", ["train", "toddler_data", "--set", "training.sed=1"],
         ["training.sed", "did you mean 'seed'"]),
    Case("cfg-unknown-section", "unknown section", ["train", "toddler_data", "--set", "trainig.lr=1"],
         ["trainig"]),
    Case("cfg-out-of-range", "negative learning rate", ["train", "toddler_data", "--set", "training.lr=-1"],
         ["training.lr"]),
    Case("cfg-wrong-type", "text where an integer belongs", ["train", "toddler_data", "--set", "lora.r=abc"],
         ["lora.r"]),
    Case("cfg-zero-batch", "batch size 0", ["train", "toddler_data", "--set", "training.batch_size=0"],
         ["training.batch_size"]),
    Case("cfg-bad-choice", "unknown precision", ["train", "toddler_data", "--set", "training.precision=fp8"],
         ["training.precision"]),
    Case("cfg-override-syntax", "override without '='", ["train", "toddler_data", "--set", "training.lr"],
         ["training.lr"]),
    Case("cfg-huge-line", "a 3 MB single-line config", ["train", "toddler_data", "--config", "huge.yaml"],
         ["huge.yaml"], write("huge.yaml", f"training:\n  {HUGE_LINE}: 1\n")),
    # --- the catalog
    Case("cat-empty", "empty catalog", ["prepare", "toddler_data"], ["empty catalog"],
         write("config/dataset_catalog.csv", "")),
    Case("cat-unknown-column", "unknown column", ["prepare", "--all"], ["unknown column 'licence'"],
         write("config/dataset_catalog.csv", "name,kind,location,licence\nx,local,a.txt,\n")),
    Case("cat-duplicate", "duplicate dataset names", ["prepare", "--all"], ["duplicate name 'a'"],
         catalog_rows("a,local,a.txt,,,,,,,,true", "a,local,b.txt,,,,,,,,true")),
    Case("cat-bad-split", "split fractions not summing to 1", ["prepare", "--all"], ["split"],
         catalog_rows("a,local,a.txt,,,,,,,0.5/0.1/0.1,true")),
    Case("cat-unterminated", "unterminated quote", ["train", "toddler_data"], ["dataset_catalog.csv"],
         write("config/dataset_catalog.csv", 'name,kind,location\n"unterminated,local,x\n')),
    Case("cat-binary", "binary catalog", ["prepare", "--all"], ["binary"],
         write("config/dataset_catalog.csv", b"\x00PK\x03\x04")),
    Case("cat-name-escape", "dataset name with ../", ["prepare", "--all"], ["invalid name"],
         catalog_rows("../evil,local,a.txt,,,,,,,,true")),
    Case("cat-location-outside", "location outside the project", ["prepare", "a"], ["outside the project"],
         catalog_rows("a,local,../../etc/passwd,,,,,,,,true")),
    Case("cat-absolute-location", "absolute location", ["prepare", "a"], ["outside the project"],
         catalog_rows("a,local,/etc/hostname,,,,,,,,true")),
    Case("cat-unknown-option", "unknown option", ["prepare", "--all"], ["unknown option 'dedup'"],
         catalog_rows("a,local,a.txt,,,,,,dedup=true,,true")),
    Case("cat-plain-http", "plain-http URL without opt-in", ["prepare", "a", "--no-tokens"], ["refusing plain-HTTP"],
         catalog_rows("a,url,http://127.0.0.1:9/a.txt,,,,,,,,true")),
    # --- source data
    Case("data-missing", "source file missing", ["prepare", "a", "--no-tokens"], ["not found"],
         catalog_rows("a,local,data/raw/none.txt,,,,,,,,true")),
    Case("data-binary", "binary source", ["prepare", "a", "--no-tokens"], ["binary"],
         lambda p, s: (catalog_rows("a,local,data/raw/a.txt,,,,,,,,true")(p, s),
                       write("data/raw/a.txt", b"\x00\x01" * 100)(p, s))),
    Case("data-non-utf8", "source not UTF-8", ["prepare", "a", "--no-tokens"], ["byte 9", "line 2", "encoding"],
         lambda p, s: (catalog_rows("a,local,data/raw/a.txt,,,,,,,,true")(p, s),
                       write("data/raw/a.txt", "hello\ncaf\xe9\n".encode("latin-1"))(p, s))),
    Case("data-empty", "empty source", ["prepare", "a", "--no-tokens"], ["no documents left"],
         lambda p, s: (catalog_rows("a,local,data/raw/a.txt,,,,,,,,true")(p, s), write("data/raw/a.txt", "")(p, s))),
    Case("data-filtered-empty", "everything filtered out", ["prepare", "a", "--no-tokens"], ["too short"],
         lambda p, s: (catalog_rows("a,local,data/raw/a.txt,,,,,,min_chars=1000,,true")(p, s),
                       write("data/raw/a.txt", "short\nlines\n")(p, s))),
    Case("data-truncated-jsonl", "JSON lines file cut mid-record", ["extract", "cut.jsonl", "--out", "o.txt"],
         ["cut.jsonl line 2", "not valid JSON"], write("cut.jsonl", '{"text": "a"}\n{"text": "b')),
    Case("data-jsonl-field", "JSON lines without the text field", ["extract", "a.jsonl", "--out", "o.txt"],
         ["no field 'text'"], write("a.jsonl", '{"story": "a"}\n')),
    Case("data-csv-column", "CSV without the text column", ["extract", "a.csv", "--out", "o.txt"],
         ["no column 'text'"], write("a.csv", "id,story\n1,hi\n")),
    Case("data-parquet-corrupt", "corrupt Parquet", ["extract", "a.parquet", "--out", "o.txt"],
         ["not a readable Parquet"], write("a.parquet", b"PAR1garbage")),
    Case("data-unknown-format", "unknown extract format", ["extract", "a.txt", "--format", "docx", "--out", "o.txt"],
         ["invalid choice"], write("a.txt", "hi\n")),
    Case("chat-binary", "binary CHAT file only", ["extract-children", "x.cha", "--out", "o.txt"],
         ["no utterances extracted"], write("x.cha", b"\x00\x01\x02")),
    Case("chat-bad-age", "age not in CHAT form", ["extract-children", "x.cha", "--out", "o.txt", "--max-age", "3y"],
         ["not in CHAT form"], write("x.cha", "@Begin\n*CHI:\thi .\n@End\n")),
    # --- evaluation inputs
    Case("eval-text-missing", "text file missing", ["evaluate", "--text", "nope.txt"], ["file not found"]),
    Case("eval-text-binary", "binary text file", ["evaluate", "--text", "b.bin"], ["binary"],
         write("b.bin", b"\x00\x01" * 50)),
    Case("eval-text-empty", "empty text file", ["evaluate", "--text", "e.txt"], ["e.txt"], write("e.txt", "")),
    Case("eval-pairs-missing", "pairs file missing", ["evaluate", "--pairs", "nope.jsonl"], ["not found"]),
    Case("eval-pairs-huge-line", "3 MB single-line pairs file", ["evaluate", "--pairs", "p.jsonl"],
         ["p.jsonl", "line 1"], write("p.jsonl", HUGE_LINE)),
    Case("eval-pairs-field", "pair without sentence_bad", ["evaluate", "--pairs", "p.jsonl"], ["sentence_bad"],
         write("p.jsonl", '{"sentence_good": "a b ."}\n')),
    Case("eval-bad-limit", "negative --limit", ["evaluate", "--pairs", "p.jsonl", "--limit", "-1"], ["--limit"],
         write("p.jsonl", '{"sentence_good": "a .", "sentence_bad": "b ."}\n')),
    Case("eval-pairs-perplexity-option", "a perplexity option with --pairs (was ignored)",
         ["evaluate", "--pairs", "p.jsonl", "--max-tokens", "5", "--stride", "3"], ["--max-tokens", "--pairs"],
         write("p.jsonl", '{"sentence_good": "a .", "sentence_bad": "b ."}\n')),
    Case("eval-pairs-option-alone", "a --pairs option without --pairs (was ignored)",
         ["evaluate", "--text", "config/dataset_catalog.csv", "--first-pass", "bf16"], ["--first-pass", "--pairs"]),
    Case("eval-pairs-same-suite-name", "two pairs files with the same name (one merged suite)",
         ["evaluate", "--pairs", "a/x.jsonl", "--pairs", "b/x.jsonl"], ["suite 'x'", "rename"],
         lambda project, src: [write(f"{d}/x.jsonl", '{"sentence_good": "a .", "sentence_bad": "b ."}\n')(project, src)
                               for d in "ab"]),
    Case("eval-unknown-dataset", "unknown dataset name", ["evaluate", "--dataset", "kidz"], ["kidz", "did you mean 'kids'"]),
    # --- adapters
    Case("adapter-missing", "adapter folder missing", ["evaluate", "--text", "config/dataset_catalog.csv",
                                                       "--adapter", "adapters/none_lora"], ["adapter folder not found"]),
    Case("adapter-truncated", "truncated safetensors", ["inspect", "weights", "adapters/cut_lora"],
         ["cut_lora"], with_adapter("cut_lora", _truncate)),
    Case("adapter-pickle", "pickle weights instead of safetensors", ["inspect", "weights", "adapters/pk_lora"],
         ["adapter_model.safetensors"], with_adapter("pk_lora", _pickle_instead)),
    Case("adapter-config-json", "malformed adapter_config.json", ["inspect", "weights", "adapters/cfg_lora"],
         ["adapter_config.json"], with_adapter("cfg_lora", _bad_config_json)),
    Case("adapter-other-base", "adapter shapes from another base", ["evaluate", "--text", "config/dataset_catalog.csv",
                                                                    "--adapter", "adapters/other_lora"],
         ["other_lora"], with_adapter("other_lora", _other_base_shapes)),
    Case("adapter-unequal-ranks", "ties merge of adapters of different rank",
         ["merge", "adapters/good_lora", "adapters/r2_lora", "--name", "m", "--method", "ties"],
         ["needs adapters of equal rank", "--method cat"],
         lambda p, s: (with_adapter("good_lora")(p, s), with_adapter("r2_lora", source="r2_lora")(p, s))),
    Case("adapter-unknown-module", "module glob that matches nothing",
         ["inspect", "values", "adapters/good_lora", "--module", "*.nothing"], ["*.nothing"], with_adapter("good_lora")),
    # --- names that could escape their folders
    Case("name-train-escape", "adapter name with ../", ["train", "toddler_data", "--adapter-name", "../x"],
         ["invalid adapter name"]),
    Case("name-train-absolute", "absolute adapter name", ["train", "toddler_data", "--adapter-name", "/tmp/x"],
         ["invalid adapter name"]),
    Case("name-merge-escape", "merge output name with ../",
         ["merge", "adapters/good_lora", "adapters/good_lora", "--name", "../../evil"], ["invalid"],
         with_adapter("good_lora")),
    Case("name-dataset-path", "dataset given as a path", ["train", "/etc/passwd"], ["'/etc/passwd'"]),
    # --- other commands' arguments
    Case("gen-no-prompt", "generate without a prompt", ["generate"], ["prompt"]),
    Case("gen-bad-tokens", "generate --max-new-tokens 0", ["generate", "--prompt", "hi", "--max-new-tokens", "0"],
         ["--max-new-tokens"]),
    Case("batch-names-and-all", "names and --all together", ["train-batch", "kids", "--all"], ["not both"]),
    Case("bench-bad-steps", "benchmark --steps 0", ["benchmark", "--steps", "0"], ["--steps"]),
    Case("cli-unknown-command", "unknown command", ["frobnicate"], ["invalid choice"]),
    # --- round two (issue 20): outputs, malformed adapters of any shape, numbers, encodings, hostile values
    Case("gen-out-existing", "generate-data --out onto an existing file", ["generate-data", "--kind", "kids",
         "--lines", "5", "--out", "config/dataset_catalog.csv"], ["exists; pass --overwrite"]),
    Case("gen-out-folder", "generate-data --out a folder", ["generate-data", "--kind", "kids", "--out", "config"],
         ["is a folder"]),
    Case("gen-out-under-file", "generate-data --out below a file",
         ["generate-data", "--kind", "kids", "--out", "config/dataset_catalog.csv/x.txt"], ["is a file, not a folder"]),
    Case("gen-zero-lines", "generate-data --lines 0", ["generate-data", "--kind", "kids", "--lines", "0"],
         ["--lines", "from 1 to"]),
    Case("merge-self", "merge of an adapter with itself", ["merge", "adapters/good_lora", "adapters/good_lora",
         "--name", "twice"], ["named twice"], with_adapter("good_lora")),
    Case("merge-nan-weight", "merge --weights nan,1", ["merge", "adapters/good_lora", "adapters/r2_lora", "--name",
         "m", "--method", "cat", "--weights", "nan,1"], ["finite"],
         lambda p, s: (with_adapter("good_lora")(p, s), with_adapter("r2_lora", source="r2_lora")(p, s))),
    Case("merge-inf-weight", "merge --weights inf,1", ["merge", "adapters/good_lora", "adapters/r2_lora", "--name",
         "m", "--method", "cat", "--weights", "inf,1"], ["finite"],
         lambda p, s: (with_adapter("good_lora")(p, s), with_adapter("r2_lora", source="r2_lora")(p, s))),
    Case("merge-export-notes", "merge --export-model onto a folder of notes with --overwrite",
         ["merge", "adapters/good_lora", "--export-model", "notes", "--overwrite"], ["not a model folder exported"],
         lambda p, s: (with_adapter("good_lora")(p, s), write("notes/ideas.txt", "keep me")(p, s))),
    Case("merge-bad-density", "merge --density 0", ["merge", "adapters/good_lora", "adapters/r2_lora", "--name", "m",
         "--method", "ties", "--density", "0"], ["--density"],
         lambda p, s: (with_adapter("good_lora")(p, s), with_adapter("r2_lora", source="r2_lora")(p, s))),
    Case("adapter-inf-weights", "adapter with an infinite weight", ["inspect", "weights", "adapters/inf_lora"],
         ["NaN or infinite"], with_adapter("inf_lora", _nan_weight)),
    Case("adapter-inf-eval", "evaluate with an infinite-weight adapter", EVAL_TEXT + ["adapters/inf_lora"],
         ["NaN or infinite"], with_adapter("inf_lora", _nan_weight)),
    Case("adapter-config-list", "adapter_config.json holding a list", ["inspect", "weights", "adapters/l_lora"],
         ["expected a JSON object"], with_adapter("l_lora", _json_file("adapter_config.json", [1, 2]))),
    Case("adapter-rank-type", "adapter rank that is not a number", EVAL_TEXT + ["adapters/r_lora"],
         ["'r' must be a positive integer"], with_adapter("r_lora", _config_field(r="eight"))),
    Case("adapter-rank-zero", "adapter rank 0", ["inspect", "weights", "adapters/r_lora"],
         ["'r' must be a positive integer"], with_adapter("r_lora", _config_field(r=0))),
    Case("adapter-alpha-type", "lora_alpha that is not a number", ["inspect", "weights", "adapters/a_lora"],
         ["'lora_alpha' must be a number"], with_adapter("a_lora", _config_field(lora_alpha=[1]))),
    Case("adapter-not-lora", "an IA3 adapter", EVAL_TEXT + ["adapters/ia3_lora"], ["not a LoRA adapter"],
         with_adapter("ia3_lora", _config_field(peft_type="IA3"))),
    Case("adapter-rank-mismatch", "config rank differs from the weights", ["inspect", "weights", "adapters/m_lora"],
         ["has rank 4", "r=8"], with_adapter("m_lora", _config_field(r=8))),
    Case("adapter-targets-mismatch", "target_modules matching none of the weights",
         EVAL_TEXT + ["adapters/t_lora"], ["would do nothing"], with_adapter("t_lora", _config_field(target_modules=["k_proj"]))),
    Case("adapter-targets-type", "target_modules of the wrong type", ["inspect", "weights", "adapters/t_lora"],
         ["'target_modules'"], with_adapter("t_lora", _config_field(target_modules=7))),
    Case("adapter-meta-list", "lora_project.json holding a list", ["inspect", "weights", "adapters/j_lora"],
         ["corrupt metadata"], with_adapter("j_lora", _json_file("lora_project.json", ["x"]))),
    Case("adapter-meta-field", "metadata field of the wrong type", EVAL_TEXT + ["adapters/j_lora"],
         ["'base_model' should be an object"], with_adapter("j_lora", _json_file("lora_project.json",
                                                                                   {"base_model": "tiny"}))),
    Case("adapter-meta-not-json", "lora_project.json that is not JSON", ["inspect", "weights", "adapters/j_lora"],
         ["corrupt metadata (not JSON)"], with_adapter("j_lora", lambda d: (d / "lora_project.json").write_text("{"))),
    Case("adapter-twice-eval", "the same adapter twice in evaluate", EVAL_TEXT + ["adapters/good_lora", "--adapter",
         "adapters/good_lora"], ["share the folder name"], with_adapter("good_lora")),
    Case("adapter-twice-generate", "the same adapter twice in generate", ["generate", "--prompt", "hi", "--adapter",
         "adapters/good_lora", "--adapter", "adapters/good_lora"], ["share the folder name"], with_adapter("good_lora")),
    Case("cfg-seed-overflow", "seed above 2^64", ["train", "toddler_data", "--set", f"training.seed={2**64}"],
         ["training.seed: must be <="]),
    Case("cfg-steps-huge", "max_steps beyond any run", ["train", "toddler_data", "--set", "training.max_steps=10**12"],
         ["training.max_steps"]),
    Case("cfg-alias-bomb-set", "YAML alias bomb in a --set value", ["train", "toddler_data", "--set",
         "training.lr=" + _BOMB], ["alias bomb"]),
    Case("cfg-alias-bomb-file", "YAML alias bomb in a config file", ["train", "toddler_data", "--config", "b.yaml"],
         ["alias bomb"], write("b.yaml", "training:\n  lr: 0.001\n" + "bomb:\n  " + _BOMB.replace("\n", "\n  "))),
    Case("cfg-huge-value", "a 1 MB --set value", ["train", "toddler_data", "--set", "training.precision=" + "z" * 1_000_000],
         ["training.precision", "chars]"]),
    Case("cfg-nan-lr", "learning rate nan", ["train", "toddler_data", "--set", "training.lr=.nan"], ["training.lr"]),
    Case("train-bad-target", "target_modules the model does not have", ["train", "toddler_data", "--no-mlflow",
         "--set", "lora.target_modules=[nope_proj]"], ["nope_proj", "not found in the model"]),
    Case("train-too-big", "a step far bigger than this machine's memory", ["train", "toddler_data", "--set",
         "training.batch_size=4096", "--set", "training.seq_len=131072"], ["GiB for one step", "available"]),
    Case("train-resume-nothing", "--resume without a checkpoint", ["train", "toddler_data", "--resume"],
         ["no checkpoint to resume"]),
    Case("cat-symlink-out", "catalog folder holding a symlink out of the project", ["prepare", "d", "--no-tokens"],
         ["link.txt is a symlink", "outside the project"], _symlink_out),
    Case("data-utf16-undeclared", "UTF-16 source without its encoding", ["prepare", "a", "--no-tokens"],
         ["encoding=utf-16 in the row's options"], lambda p, s: (catalog_rows("a,local,data/raw/a.txt,,,,,,,,true")(p, s),
                                              write("data/raw/a.txt", "one line\ntwo\n".encode("utf-16"))(p, s))),
    Case("data-bad-encoding", "unknown encoding option", ["prepare", "a", "--no-tokens"], ["unknown encoding"],
         lambda p, s: (catalog_rows("a,local,data/raw/a.txt,,,,,,encoding=klingon,,true")(p, s),
                       write("data/raw/a.txt", "one\ntwo\n")(p, s))),
    Case("eval-pairs-binary", "binary minimal-pairs file", ["evaluate", "--pairs", "p.jsonl"], ["binary"],
         write("p.jsonl", b"\x00\x01\x02" * 20)),
    Case("eval-text-folder", "evaluate --text a folder", ["evaluate", "--text", "config"], ["not a file"]),
    Case("eval-dataset-stats-corrupt", "prepared dataset with a truncated stats.json",
         ["evaluate", "--dataset", "kids"], ["kids", "damaged", "prepare kids --force"],
         lambda p, s: (write("data/processed/kids/stats.json", "{broken")(p, s),
                       write("data/processed/kids/test.txt", "a b c\n")(p, s))),
    Case("eval-dataset-stats-not-object", "prepared dataset whose stats.json is a list",
         ["evaluate", "--dataset", "kids"], ["kids", "not an object"],
         lambda p, s: (write("data/processed/kids/stats.json", "[1]")(p, s),
                       write("data/processed/kids/test.txt", "a b c\n")(p, s))),
    Case("eval-dataset-split-bytes", "prepared split that is not UTF-8", ["evaluate", "--dataset", "kids"],
         ["kids", "test.txt", "damaged"],
         lambda p, s: (write("data/processed/kids/stats.json", '{"separator": "\\n"}')(p, s),
                       write("data/processed/kids/test.txt", b"ok\n\xff\xfe bad\n")(p, s))),
    Case("eval-metrics-not-folder", "outputs/metrics is a file (checked before scoring)",
         ["evaluate", "--pairs", "p.jsonl"], ["outputs/metrics", "not a folder"],
         lambda p, s: (shutil.rmtree(p / "outputs" / "metrics", ignore_errors=True),
                       write("outputs/metrics", "not a folder")(p, s),
                       write("p.jsonl", '{"sentence_good": "a .", "sentence_bad": "b ."}\n')(p, s))),
    Case("gen-bad-temperature", "generate --temperature -1", ["generate", "--prompt", "hi", "--temperature", "-1"],
         ["--temperature"]),
    Case("gen-bad-top-p", "generate --top-p 0", ["generate", "--prompt", "hi", "--top-p", "0"], ["--top-p"]),
    Case("batch-unknown", "train-batch of an unknown dataset", ["train-batch", "kidz"], ["kidz", "did you mean"]),
    Case("extract-out-existing", "extract --out onto an existing file", ["extract", "a.txt",
         "--out", "config/training_config.yaml"], ["exists; pass --overwrite"], write("a.txt", "hello there\n")),
    Case("extract-children-out-folder", "extract-children --out a folder", ["extract-children", "x.cha", "--out",
         "config"], ["folder"], write("x.cha", "@Begin\n*CHI:\tmore juice .\n@End\n")),
    Case("config-bad-set", "config with a malformed override", ["config", "--set", "training.lr"],
         ["expected section.key=value"]),
    # --- adopting an old project, and the catalog one row at a time
    Case("adopt-missing", "old project folder that does not exist", ["adopt", "../no_such_project"],
         ["folder not found"]),
    Case("adopt-not-folder", "a file instead of a folder", ["adopt", "../notes.txt"], ["is not a folder"],
         outside("notes.txt", "hello\n")),
    Case("adopt-project-itself", "the project itself", ["adopt", "."], ["this project itself"]),
    Case("adopt-inside-project", "a folder inside the project", ["adopt", "config"], ["inside this project"]),
    Case("adopt-holds-project", "a folder that holds the project", ["adopt", ".."], ["contains this project"]),
    Case("adopt-symlink-loop", "a symbolic link loop", ["adopt", "../loop"], ["symbolic link loop"],
         lambda p, s: (p.parent / "loop").symlink_to("loop")),
    Case("adopt-undo-not-manifest", "--undo with a file that is not a manifest",
         ["adopt", "--undo", "config/dataset_catalog.csv"], ["not an adoption manifest"]),
    Case("adopt-undo-foreign-json", "--undo with JSON that is not a manifest", ["adopt", "--undo", "m.json"],
         ["not an adoption manifest"], write("m.json", '{"items": []}')),
    Case("adopt-undo-missing", "--undo with a manifest that does not exist",
         ["adopt", "--undo", "outputs/adopt/adopt_none.json"], ["manifest not found"]),
    Case("catalog-add-missing", "catalog add of a missing file", ["catalog", "add", "x", "../nope.txt"],
         ["not found"]),
    Case("catalog-add-duplicate", "catalog add of a name already there", ["catalog", "add", "kids", "../n.txt"],
         ["already in the catalog"], outside("n.txt", "hi there\n")),
    Case("catalog-add-bad-name", "catalog add with a name that escapes", ["catalog", "add", "../x", "../n.txt"],
         ["invalid dataset name"], outside("n.txt", "hi there\n")),
    Case("catalog-add-binary", "catalog add of a binary file", ["catalog", "add", "b", "../b.txt"],
         ["binary"], outside("b.txt", b"\x00\x01" * 50)),
    Case("catalog-remove-unknown", "catalog remove of an unknown name", ["catalog", "remove", "kidz"],
         ["did you mean 'kids'"]),
    *ROUND_THREE,
]


@pytest.fixture(scope="module")
def adapters_src(tmp_path_factory, tiny_model_dir) -> Path:
    from test_inspection import make_adapter

    root = tmp_path_factory.mktemp("matrix_adapters")
    import json

    for name, seed, r in (("good_lora", 1, 4), ("r2_lora", 2, 2)):
        make_adapter(tiny_model_dir, root / name, seed, r=r)
        meta_path = root / name / "lora_project.json"
        meta = json.loads(meta_path.read_text())
        meta["base_model"].pop("fingerprint")  # made on the tiny base, not bound to its fingerprint
        meta_path.write_text(json.dumps(meta))
    return root


def test_commands_without_an_encoding_option_do_not_suggest_one(project):
    """`evaluate --text` and `generate --prompts-file` read UTF-8 only: the advice is to convert the
    file, not an --encoding they do not have."""
    (project / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for args in (["evaluate", "--text", "latin1.txt"], ["generate", "--prompts-file", "latin1.txt"]):
        proc = run_cli(*args, cwd=project)
        assert_user_error(proc, "latin1.txt", "not UTF-8", "convert the file to UTF-8")
        assert "--encoding" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, project, adapters_src):
    if case.setup:
        case.setup(project, adapters_src)
    before = snapshot(project)
    proc = run_cli(*case.args, cwd=project)
    assert_user_error(proc, *case.fragments)
    line = next(l for l in proc.stderr.splitlines() if l.startswith("error:"))
    assert len(line) <= MAX_ERROR_CHARS, f"error line of {len(line)} chars"
    after = snapshot(project)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed changed"
    new = [k for k in after if k not in before and not k.endswith(".lock")]
    assert not any(k.startswith(("adapters/", "experiments/", "data/processed/")) for k in new), new


def test_every_subcommand_is_in_the_matrix():
    from test_cli_ranges import COMMANDS

    named = {" ".join(c.args[:2]) for c in CASES} | {c.args[0] for c in CASES}
    missing = [" ".join(w) for w in COMMANDS if " ".join(w) not in named]
    assert not missing, f"subcommands with no bad-input case: {missing}"
    assert len(CASES) >= 150


def test_matrix_is_listed_in_research_notes():
    notes = (REPO / "docs" / "research_notes.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in notes]
    assert not missing, f"add these bad-input cases to docs/research_notes.md: {missing}"
    assert len(CASES) >= 40


def test_research_notes_table_rows_come_from_the_matrix():
    """The table in the notes is generated from CASES; regenerate it with `python tests/test_bad_input_matrix.py`."""
    notes = (REPO / "docs" / "research_notes.md").read_text()
    assert markdown_table() in notes


def markdown_table() -> str:
    rows = ["| case | bad input | command | outcome |", "|---|---|---|---|"]
    for c in CASES:
        cmd = " ".join(c.args)
        cmd = (cmd if len(cmd) <= 48 else cmd[:45] + "...").replace("|", "/")
        rows.append(f"| `{c.id}` | {c.what} | `lora-project {cmd}` | exit 2, one line naming "
                    f"{', '.join(repr(f) for f in c.fragments[:2]).replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
