"""Generator, cleaning, deterministic splits, packing and the token cache."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from lora_project.data.generator import Grammar, generate_corpus, generate_lines
from lora_project.data.preprocessor import (
    SPLITS,
    assign_split,
    normalise,
    prepare_text,
    read_split,
    split_documents,
)
from lora_project.data.tokenizer_utils import block, cached_stream, num_blocks
from lora_project.errors import UserError
from lora_project.models.tokens import pack_documents


def test_generator_same_seed_same_bytes_and_seed_matters(tmp_path):
    g = REPO / "config" / "grammars" / "toddler.yaml"
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    generate_corpus(g, a, seed=7, n_lines=500)
    generate_corpus(g, b, seed=7, n_lines=500)
    generate_corpus(g, c, seed=8, n_lines=500)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    lines = a.read_text().splitlines()
    assert len(lines) == 500
    # Toddler speech is telegraphic: short utterances, lower case, no leftover <SYMBOLS>.
    assert max(len(line.split()) for line in lines) <= 6
    assert not any("<" in line or ">" in line for line in lines)


def test_kids_grammar_makes_full_capitalised_sentences():
    g = Grammar.load(REPO / "config" / "grammars" / "kids.yaml")
    lines = generate_lines(g, 200, seed=1)
    assert all(line[0].isupper() and line[-1] in ".?!" for line in lines)
    assert sum(len(line.split()) for line in lines) / len(lines) > 5


def test_grammar_errors_are_reported(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("start: S\nrules:\n  S: ['<NOUNS> go']\n  NOUN: [dog]\n")
    with pytest.raises(UserError, match=r"<NOUNS> has no rule \(did you mean 'NOUN'\?\)"):
        Grammar.load(bad)
    loop = tmp_path / "loop.yaml"
    loop.write_text("start: S\nrules:\n  S: ['a <S>']\n")
    with pytest.raises(UserError, match="recursion"):
        generate_lines(Grammar.load(loop), 1, 0)


def test_normalise_bom_crlf_nfc():
    text = "\ufeffcafe\u0301 one\r\ntwo\rthree\n"
    out = normalise(text)
    assert out == "caf\u00e9 one\ntwo\nthree\n"


def test_split_documents_formats():
    assert split_documents("a\n\n b \nc", "lines") == ["a", "b", "c"]
    assert split_documents("p1 l1\np1 l2\n\n\np2\n", "paragraphs") == ["p1 l1\np1 l2", "p2"]
    assert split_documents("x<|endoftext|> y <|endoftext|>", "separator", "<|endoftext|>") == ["x", "y"]


def test_hash_split_is_order_independent_and_roughly_proportional():
    docs = [f"utterance number {i}" for i in range(4000)]
    a = {d: assign_split(d, (0.8, 0.1, 0.1)) for d in docs}
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert all(assign_split(d, (0.8, 0.1, 0.1)) == a[d] for d in shuffled)
    counts = {s: sum(1 for v in a.values() if v == s) for s in SPLITS}
    assert 0.77 < counts["train"] / 4000 < 0.83 and 0.08 < counts["test"] / 4000 < 0.12


def test_prepare_is_deterministic_disjoint_and_idempotent(tmp_path):
    src = tmp_path / "raw.txt"
    lines = [f"line {i % 300} text" for i in range(1000)]  # many duplicates
    src.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    out = tmp_path / "proc"
    first = prepare_text("d", src, out, "lines", (0.8, 0.1, 0.1), {"dedupe": True})
    assert not first.skipped
    splits = {s: read_split(out, s) for s in SPLITS}
    all_docs = [d for s in SPLITS for d in splits[s]]
    assert len(all_docs) == len(set(all_docs)) == 300  # duplicates removed, nothing lost
    assert first.stats["cleaning"]["duplicates_removed"] == 700
    for s in SPLITS:
        assert (out / f"{s}.txt").read_bytes().count(b"\r") == 0
        assert first.stats["splits"][s]["bytes"] == (out / f"{s}.txt").stat().st_size
    before = {s: (out / f"{s}.txt").stat().st_mtime_ns for s in SPLITS}
    second = prepare_text("d", src, out, "lines", (0.8, 0.1, 0.1), {"dedupe": True})
    assert second.skipped
    assert before == {s: (out / f"{s}.txt").stat().st_mtime_ns for s in SPLITS}
    # Changing an option rebuilds; same result for same inputs.
    third = prepare_text("d", src, out, "lines", (0.8, 0.1, 0.1), {"dedupe": True, "min_chars": 3})
    assert not third.skipped
    assert read_split(out, "train") == splits["train"]


@pytest.mark.parametrize("content, fragment", [
    (b"", "no documents left"),
    (b"\x00\x01binary\x00", "binary"),
    (b"ok line\nbad \xff\xfe byte\n", "not UTF-8 (byte 12, line 2)"),
])
def test_prepare_bad_inputs(tmp_path, content, fragment):
    src = tmp_path / "raw.txt"
    src.write_bytes(content)
    with pytest.raises(UserError) as exc:
        prepare_text("d", src, tmp_path / "out", "lines", (0.8, 0.1, 0.1), {})
    assert fragment in str(exc.value)
    assert not (tmp_path / "out" / "stats.json").exists()


def test_failed_prepare_keeps_earlier_output(tmp_path):
    src = tmp_path / "raw.txt"
    src.write_text("a\nb\nc\nd\ne\n")
    out = tmp_path / "out"
    prepare_text("d", src, out, "lines", (0.8, 0.1, 0.1), {})
    saved = {p.name: p.read_bytes() for p in out.iterdir()}
    src.write_bytes(b"\xff\xff")
    with pytest.raises(UserError):
        prepare_text("d", src, out, "lines", (0.8, 0.1, 0.1), {})
    assert saved == {p.name: p.read_bytes() for p in out.iterdir()}


def test_packing_puts_eos_between_documents_and_blocks_cover_stream(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    docs = ["the dog runs.", "more cookie please.", "bye bye doggy."]
    stream = pack_documents(tok, docs)
    assert stream.dtype == np.uint16
    eos = tok.eos_token_id
    assert int((stream == eos).sum()) == len(docs) and stream[-1] == eos
    pieces = np.split(stream, np.where(stream == eos)[0] + 1)[:-1]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
    # Blocks overlap by one token: each target position predicted exactly once, no padding.
    seq = 4
    n = num_blocks(len(stream), seq)
    targets = np.concatenate([block(stream, i, seq)[1:] for i in range(n)])
    assert np.array_equal(targets, stream[1:1 + n * seq])
    # Cache: second call returns the same tokens from disk (memory-mapped).
    a = cached_stream(tok, docs, tmp_path, "train")
    b = cached_stream(tok, docs, tmp_path, "train")
    assert isinstance(b, np.memmap) and np.array_equal(a, b)
    assert len(list(tmp_path.glob("train-*.npy"))) == 1
    cached_stream(tok, docs + ["new doc."], tmp_path, "train")
    assert len(list(tmp_path.glob("train-*.npy"))) == 2  # content change -> new cache key


def test_stats_json_records_fingerprints(tmp_path):
    src = tmp_path / "raw.txt"
    src.write_text("one\ntwo\nthree\nfour\nfive\n")
    prep = prepare_text("d", src, tmp_path / "out", "lines", (0.6, 0.2, 0.2), {})
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == prep.stats
    assert len(stats["source_sha256"]) == 64 and stats["settings"]["split"] == [0.6, 0.2, 0.2]


def test_read_user_text_decodes_first_then_judges(tmp_path):
    from lora_project.utils.text_io import read_user_text

    u16 = tmp_path / "u16.txt"
    u16.write_bytes("mommy want juice\nbye\n".encode("utf-16"))  # NUL bytes, BOM: still text
    assert read_user_text(u16, encoding="utf-16") == "mommy want juice\nbye\n"
    with pytest.raises(UserError, match="binary.*--encoding utf-16"):
        read_user_text(u16)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"abc\n\xe9t\xe9\n")
    with pytest.raises(UserError, match=r"not UTF-8 \(byte 4, line 2\)"):
        read_user_text(latin)
    assert read_user_text(latin, encoding="latin-1") == "abc\nété\n"
    with pytest.raises(UserError, match="unknown encoding 'nope'"):
        read_user_text(latin, encoding="nope")
    controls = tmp_path / "ctl.txt"
    controls.write_bytes(bytes(range(1, 9)) * 20)  # valid UTF-8, but control characters only
    with pytest.raises(UserError, match="binary"):
        read_user_text(controls)


def test_json_output_is_strict_json(tmp_path):
    import json as _json

    from lora_project.utils.io_utils import atomic_write_json, json_text

    obj = {"ppl": float("nan"), "gain": [1.0, float("inf"), -float("inf")], "n": 3, "t": (1, 2)}
    text = json_text(obj)
    assert _json.loads(text) == {"ppl": None, "gain": [1.0, None, None], "n": 3, "t": [1, 2]}
    assert "NaN" not in text and "Infinity" not in text
    atomic_write_json(tmp_path / "r.json", obj)
    _json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_a_folder_location_with_a_symlink_out_of_the_project_is_refused(tmp_path):
    from lora_project.paths import ProjectPaths

    root = tmp_path / "proj"
    (root / "data" / "raw" / "d").mkdir(parents=True)
    (root / "data" / "raw" / "d" / "ok.txt").write_text("fine\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours\n")
    paths = ProjectPaths(root.resolve())
    assert paths.inside(Path("data/raw/d"), "location").is_dir()
    (root / "data" / "raw" / "d" / "link.txt").symlink_to(secret)
    with pytest.raises(UserError, match="link.txt is a symlink to .*secret.txt, outside the project"):
        paths.inside(Path("data/raw/d"), "dataset 'd' location")
    (root / "data" / "raw" / "d" / "link.txt").unlink()
    (root / "data" / "raw" / "d" / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UserError, match="sub is a symlink"):
        paths.inside(Path("data/raw/d"), "location")
    (root / "data" / "raw" / "d" / "sub").unlink()
    (root / "data" / "raw" / "d" / "inner").symlink_to(root / "data" / "raw" / "d" / "ok.txt")
    assert paths.inside(Path("data/raw/d"), "location")  # a link inside the project is fine


def test_catalog_separator_escapes_keep_non_ascii_text():
    from lora_project.data.catalog import parse_catalog

    row = ("name,kind,location,format,text_field,sha256,license,description,options,split,enabled\n"
           "s,local,data/raw/s.txt,separator,,,,,sep=§\\n— ü\\t\\\\x,0.8/0.1/0.1,true\n")
    entry = parse_catalog(row)["s"]
    assert entry.option("sep", None) == "§\n— ü\t\\x"  # unicode_escape used to mangle § and ü


def test_written_files_follow_the_umask_not_tempfile_defaults(tmp_path):
    from lora_project.utils.io_utils import atomic_directory, atomic_write_text

    old = os.umask(0o022)
    try:
        import lora_project.utils.io_utils as io

        io._UMASK = None
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d", overwrite=False) as tmp:
            (tmp / "f").write_text("y")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # tempfile alone gives 0600
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700
    finally:
        os.umask(old)
        io._UMASK = None


def test_a_catalog_with_many_bad_rows_gets_one_readable_line():
    """The first problems in full, then how many more: the line stays short whatever the file holds
    (hypothesis once found a 3-row catalog whose joined problems were 628 characters)."""
    from lora_project.data.catalog import parse_catalog

    text = "name,name,kind,format,location\n" + "".join(f",,,{i}\n" for i in range(40))
    with pytest.raises(UserError) as err:
        parse_catalog(text)
    line = str(err.value)
    assert len(line) <= 600 and line.startswith("catalog row 2: invalid name")
    assert re.search(r"; and \d+ more problem\(s\)$", line)
    one = "name,kind,location\nok,local,\n"
    with pytest.raises(UserError, match=r"location is empty$"):  # a single problem: no count
        parse_catalog(one)
