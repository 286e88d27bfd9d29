"""Corpus extraction (CHILDES, Gutenberg, JSONL/CSV/Parquet/save_to_disk), downloads and
catalog kinds url/childes: small fixtures written here, plus integration on ../shared/data."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, assert_user_error, run_cli, snapshot

from lora_project.data.childes import extract_children, parse_age, utterance_text
from lora_project.data.extract import read_documents, strip_gutenberg
from lora_project.errors import UserError

# The 2023+ CHAT release (two-digit months, [+ IMP] postcodes, &=0 notation that strict
# pylangacq rejects) and the ~2012 release (ages like 2;3.04, wrapped tiers).
NEW_CHA = """@UTF8
@PID:\t11312/c-00015437-1
@Begin
@Languages:\teng
@Participants:\tCHI Eve Target_Child, MOT Sue Mother, SIS Ann Sibling
@ID:\teng|Brown|CHI|1;06.00|female|||Target_Child|||
@ID:\teng|Brown|MOT|||||Mother|||
@ID:\teng|Brown|SIS|4;02.|female|||Sibling|||
*CHI:\tmore cookie . [+ IMP]
*MOT:\tyou want more cookies ?
*CHI:\txxx .
*CHI:\t&=0v I <want want> [/] want juice !
*CHI:\tbunny+rabbit +...
*SIS:\tno Eve .
*CHI:\t0is (th)at mi:lk ?
@End
"""
OLD_CHA = """@Begin
@Participants:\tCHI Adam Target_Child, URS Ursula Investigator
@ID:\teng|brown|CHI|2;3.04|male|normal||Target_Child||
@ID:\teng|brown|URS|||||Investigator||
*CHI:\tplay checkers .
*URS:\tyou want to play checkers ?
*CHI:\tbig drum
\tbig drum .
*CHI:\tyyy .
@End
"""


def test_utterance_text_and_ages():
    assert utterance_text(["more", "cookie", "."]) == "more cookie."
    assert utterance_text(["bunny+rabbit", "+..."]) == "bunny rabbit..."
    assert utterance_text(["Humpty_Dumpty", "mi:lk", "?"]) == "Humpty Dumpty milk?"
    assert utterance_text(["."]) is None and utterance_text(["", "+/."]) is None
    assert utterance_text(["yes", ",", "please", "!"]) == "yes, please!"
    assert parse_age("2;3.04") == pytest.approx(27 + 4 / 30)
    assert parse_age("1;06.00") == parse_age("1;6") == parse_age("1;06") == 18
    assert parse_age("3") == parse_age("3;") == 36
    for bad in ("two", "1;13", "", "1;06;00"):
        with pytest.raises(UserError):
            parse_age(bad)


def test_chat_files_of_both_releases(tmp_path):
    (tmp_path / "new.cha").write_text(NEW_CHA)
    (tmp_path / "old.cha").write_text(OLD_CHA)
    ex = extract_children([tmp_path])
    # Files in sorted order; retracing (<want want> [/]) and 'xxx' are gone, the child's own words stay.
    assert ex.lines == ["more cookie.", "I want juice!", "bunny rabbit...", "that milk?",
                        "play checkers.", "big drum big drum."]
    by_file = {Path(f.file).name: f for f in ex.files}
    assert by_file["old.cha"].ages == {"CHI": "2;03.04"} and by_file["new.cha"].ages == {"CHI": "1;06.00"}
    assert by_file["new.cha"].utterances == 5 and by_file["new.cha"].lines == 4   # 'xxx .' has no word
    assert by_file["old.cha"].lenient and "&=0" in by_file["new.cha"].lenient  # strict mode refused both
    # Speakers by role, and the age filter applies per speaker: the sibling (4;02) is out of range.
    ex2 = extract_children([tmp_path / "new.cha"], ["CHI", "Sibling"], max_age="3;00")
    assert ex2.lines == ["more cookie.", "I want juice!", "bunny rabbit...", "that milk?"]
    ex3 = extract_children([tmp_path / "new.cha"], ["Sibling"], min_age="4")
    assert ex3.lines == ["no Eve."]
    ex4 = extract_children([tmp_path], min_age="2;00")
    assert [f.skipped for f in ex4.files] == ["age outside the range", None]


def test_bad_chat_files_are_skipped_and_counted(tmp_path):
    import zipfile

    (tmp_path / "good.cha").write_text(OLD_CHA)
    (tmp_path / "binary.cha").write_bytes(b"\x00\x01\x02PK")
    (tmp_path / "latin.cha").write_bytes(OLD_CHA.replace("checkers", "ch\xe9ckers").encode("latin-1"))
    with zipfile.ZipFile(tmp_path / "corpus.zip", "w") as zf:
        zf.writestr("Brown/new.cha", NEW_CHA)
    warnings: list[str] = []
    ex = extract_children([tmp_path], warn=warnings.append)
    assert len(ex.problems) == 2 and len(warnings) == 2
    assert any("binary" in w for w in warnings)
    assert any("latin.cha: not UTF-8 (byte" in w and "line 5)" in w for w in warnings)
    assert ex.lines.count("more cookie.") == 1 and ex.lines.count("play checkers.") == 1
    assert "chécker" in " ".join(extract_children([tmp_path / "latin.cha"], encoding="latin-1").lines)


def test_extract_children_cli(project, tmp_path):
    src = tmp_path / "chat"
    src.mkdir()
    (src / "a.cha").write_text(NEW_CHA)
    out = project / "data" / "raw" / "chi.txt"
    proc = run_cli("extract-children", str(src), "--out", str(out), "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().splitlines()[0] == "more cookie."
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["lines"] == 4 and side["per_file"][0]["ages"] == {"CHI": "1;06.00"}
    before = snapshot(project)
    assert_user_error(run_cli("extract-children", str(src), "--out", str(out), cwd=project), "exists")
    assert_user_error(run_cli("extract-children", str(src), "--out", str(tmp_path / "x.txt"), "--min-age", "6",
                              cwd=project), "no utterances extracted")
    assert_user_error(run_cli("extract-children", str(src), "--out", str(tmp_path / "x.txt"), "--min-age", "old",
                              cwd=project), "not in CHAT form")
    assert_user_error(run_cli("extract-children", str(tmp_path / "none"), "--out", str(tmp_path / "x.txt"),
                              cwd=project), "not found")
    assert snapshot(project) == before


GUTENBERG = ("\ufeffThe Project Gutenberg EBook of Tiny Tales\r\n\r\nThis eBook is for the use of anyone\r\n\r\n"
             "*** START OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***\r\n\r\nProduced by Someone\r\n\r\n"
             "Once upon a time a fox\r\nmet a crow.\r\n\r\nThe crow sang.\r\n\r\n"
             "End of the Project Gutenberg EBook of Tiny Tales\r\n\r\n"
             "*** END OF THIS PROJECT GUTENBERG EBOOK TINY TALES ***\r\n\r\nLicence text here.\r\n")


def test_gutenberg_header_footer_bom_crlf(tmp_path):
    (tmp_path / "book.txt").write_bytes(GUTENBERG.encode("utf-8"))
    docs, info = read_documents(tmp_path / "book.txt", "gutenberg")
    assert docs == ["Once upon a time a fox met a crow.", "The crow sang."]
    assert info["gutenberg_boilerplate_removed"] == 1
    assert strip_gutenberg("no markers here\n") == ("no markers here\n", False)


def test_structured_formats_and_their_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"story": "One."}\n\n{"story": "Two."}\n{"story": null}\n')
    assert read_documents(tmp_path / "a.jsonl", "auto", "story")[0] == ["One.", "Two."]
    (tmp_path / "bad.jsonl").write_text('{"story": "One."}\n{"story": \n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2: not valid JSON"):
        read_documents(tmp_path / "bad.jsonl", "jsonl", "story")
    with pytest.raises(UserError, match=r"no field 'stroy' \(did you mean 'story'\?\)"):
        read_documents(tmp_path / "a.jsonl", "jsonl", "stroy")
    (tmp_path / "t.csv").write_text('id,text\n1,"Hello, there."\n2,"Two\nlines"\n')
    assert read_documents(tmp_path / "t.csv")[0] == ["Hello, there.", "Two\nlines"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["P one.", "P two."], "n": [1, 2]}), tmp_path / "p.parquet")
    assert read_documents(tmp_path / "p.parquet")[0] == ["P one.", "P two."]
    with pytest.raises(UserError, match="holds int"):
        read_documents(tmp_path / "p.parquet", "parquet", "n")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        read_documents(tmp_path / "fake.parquet")
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["H one.", "H two."]}),
                 "test": Dataset.from_dict({"text": ["H three."]})}).save_to_disk(str(tmp_path / "hf"))
    docs, info = read_documents(tmp_path / "hf")
    assert info["format"] == "hf_disk" and sorted(docs) == ["H one.", "H three.", "H two."]
    (tmp_path / "sep.txt").write_text("A story.<|endoftext|>\nB story.\n<|endoftext|>")
    assert read_documents(tmp_path / "sep.txt", "separator", sep="<|endoftext|>")[0] == ["A story.", "B story."]
    with pytest.raises(UserError, match="unknown format 'yaml'"):
        read_documents(tmp_path / "sep.txt", "yaml")


def test_extract_cli_writes_corpus_and_sidecar(project, tmp_path):
    (tmp_path / "book.txt").write_bytes(GUTENBERG.encode("utf-8"))
    out = tmp_path / "books.txt"
    proc = run_cli("extract", str(tmp_path / "book.txt"), "--format", "gutenberg", "--out", str(out), cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "Once upon a time a fox met a crow.\nThe crow sang.\n"
    assert json.loads(Path(str(out) + ".json").read_text())["documents"] == 2
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff" * 50)
    assert_user_error(run_cli("extract", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "o.txt"),
                              cwd=project), "binary")
    assert not (tmp_path / "o.txt").exists()


# ---------------------------------------------------------------- catalog kinds and downloads


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on loopback serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _catalog(project, rows: list[str]):
    path = project / "config" / "dataset_catalog.csv"
    head = path.read_text().splitlines()[0]
    path.write_text("\n".join([head, *rows]) + "\n")


def test_url_rows_download_verify_and_refuse(project, http_server):
    www, base = http_server
    body = "".join(f"Speaker {i}:\nLine {i} of the play.\n\n" for i in range(60))
    (www / "play.txt").write_text(body)
    good = hashlib.sha256(body.encode()).hexdigest()
    _catalog(project, [f"play,url,{base}/play.txt,paragraphs,,{good},,,allow_http=true,0.8/0.1/0.1,true",
                       f"wrongsum,url,{base}/play.txt,paragraphs,,{'0' * 64},,,allow_http=true,0.8/0.1/0.1,true",
                       f"plainhttp,url,{base}/play.txt,paragraphs,,,,,,0.8/0.1/0.1,true",
                       f"missing,url,{base}/nope.txt,lines,,,,,allow_http=true,0.8/0.1/0.1,true"])
    proc = run_cli("prepare", "play", "--no-tokens", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert (project / "data" / "datasets" / "play" / "play.txt").read_text() == body
    stats = json.loads((project / "data" / "processed" / "play" / "stats.json").read_text())
    assert sum(s["documents"] for s in stats["splits"].values()) == 60
    assert_user_error(run_cli("prepare", "wrongsum", "--no-tokens", cwd=project), "checksum mismatch")
    assert list((project / "data" / "datasets" / "wrongsum").iterdir()) == []  # nothing partial left
    assert_user_error(run_cli("prepare", "plainhttp", "--no-tokens", cwd=project), "refusing plain-HTTP")
    assert_user_error(run_cli("prepare", "missing", "--no-tokens", cwd=project), "HTTP 404")
    # --all over good and bad rows: the good one is kept, the failures are named.
    before = snapshot(project / "data" / "processed")
    proc = run_cli("prepare", "--all", "--no-tokens", cwd=project)
    assert proc.returncode == 2 and "3 of 4 datasets failed: wrongsum, plainhttp, missing" in proc.stderr
    assert "play: unchanged, skipped" in proc.stdout
    assert snapshot(project / "data" / "processed") == before


def test_catalog_option_values_may_hold_semicolons(project):
    _catalog(project, ["kids_chat,childes,data/childes,,,,,,participants=CHI;min_age=1;06;max_age=3;00,,false",
                       "bad_age,childes,data/childes,,,,,,min_age=1;13,,false",
                       "bad_url,url,data/x.txt,,,,,,,,false"])
    proc = run_cli("prepare", "kids_chat", cwd=project)
    assert proc.returncode == 2
    assert "row 3: option min_age: age '1;13'" in proc.stderr and "row 4: kind url needs" in proc.stderr
    from lora_project.data.catalog import parse_catalog

    text = (project / "config" / "dataset_catalog.csv").read_text().splitlines()
    entry = parse_catalog("\n".join(text[:2]))["kids_chat"]
    assert entry.options == {"participants": "CHI", "min_age": "1;06", "max_age": "3;00"}


needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


def _independent_word_utterances(path: Path) -> int:
    """*CHI: utterances holding a word, counted without pylangacq (continuation lines joined,
    bracket codes, &-fillers, 0-omissions, +-linkers and xxx/yyy/www dropped)."""
    utts: list[str] = []
    current = None
    for line in path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n"):
        if line.startswith("\t") and current is not None:
            utts[-1] += " " + line.strip()
            continue
        current = line[5:] if line.startswith("*CHI:") else None
        if current is not None:
            utts.append(current)
    n = 0
    for u in utts:
        u = re.sub(r"\[[^\]]*\]", " ", re.sub(r"\x15[^\x15]*\x15", " ", u)).replace("<", " ").replace(">", " ")
        words = [t for t in u.split() if not t.startswith(("&", "0", "+", "xxx", "yyy", "www"))]
        n += any(re.search("[A-Za-z]", t) for t in words)
    return n


@needs_shared
def test_childes_shared_transcripts_line_counts_and_ages():
    files = sorted((SHARED_DATA / "childes").rglob("*.cha"))
    assert len(files) == 4
    ex = extract_children([SHARED_DATA / "childes"])
    reports = {Path(f.file).name: f for f in ex.files}
    for f in files:
        assert reports[f.name].lines == _independent_word_utterances(f), f.name
        assert reports[f.name].ages["CHI"] is not None
    assert {n: r.ages["CHI"] for n, r in reports.items()} == {
        "Brown_Adam_adam01.cha": "2;03.04", "Brown_Sarah_sarah001.cha": "2;03.05",
        "Manchester_becky_becky01a.cha": "2;00.07", "eve_010600a.cha": "1;06.00"}
    assert len(ex.lines) == 1263 + 87 + 312 + 704
    assert all(line.strip() and "xxx" not in line and "[" not in line and "&" not in line for line in ex.lines)


@needs_shared
def test_catalog_of_shared_files_served_on_loopback(project, http_server):
    """Every kind on real corpora: url (Tiny Shakespeare, Gutenberg books), local separator
    file, childes folder; then a second run that does nothing."""
    www, base = http_server
    shutil.copy(SHARED_DATA / "tinyshakespeare" / "input.txt", www / "input.txt")
    shutil.copy(SHARED_DATA / "children_stories" / "gutenberg" / "grimms_fairy_tales_pg2591.txt", www / "grimms.txt")
    shutil.copytree(SHARED_DATA / "childes", project / "data" / "childes")
    (project / "data" / "raw").mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED_DATA / "children_stories" / "tinystories" / "tinystories_sample.txt",
                project / "data" / "raw" / "tinystories.txt")
    sha = hashlib.sha256((www / "input.txt").read_bytes()).hexdigest()
    _catalog(project, [
        f"shakespeare,url,{base}/input.txt,paragraphs,,{sha},,,allow_http=true,0.8/0.1/0.1,true",
        f"grimms,url,{base}/grimms.txt,gutenberg,,,,,allow_http=true,0.8/0.1/0.1,true",
        "tinystories,local,data/raw/tinystories.txt,separator,,,,,sep=<|endoftext|>,0.6/0.2/0.2,true",
        "childes,childes,data/childes,,,,,,participants=CHI;min_age=1;00;max_age=5;00;dedupe=false,0.8/0.1/0.1,true",
    ])
    proc = run_cli("prepare", "--all", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert set(stats) == {"shakespeare", "grimms", "tinystories", "childes"}
    for name, st in stats.items():
        assert st["splits"]["train"]["documents"] > 0 and st["splits"]["train"]["tokens"] > 0, name
    assert sum(s["documents"] for s in stats["childes"]["splits"].values()) == 1263 + 87 + 312 + 704
    assert sum(s["documents"] for s in stats["tinystories"]["splits"].values()) == 5
    grimms = "".join((project / "data" / "processed" / "grimms" / f"{s}.txt").read_text()
                     for s in ("train", "validation", "test"))
    assert "Gutenberg" not in grimms and "\r" not in grimms and "\ufeff" not in grimms
    assert "Hansel" in grimms or "HANSEL" in grimms
    shakespeare = json.loads((project / "data" / "processed" / "shakespeare" / "stats.json").read_text())
    assert shakespeare["source_sha256"] == sha
    before = snapshot(project / "data")
    t0 = time.perf_counter()
    again = run_cli("prepare", "--all", cwd=project)
    assert again.returncode == 0 and again.stdout.count("unchanged, skipped") == 4, again.stdout
    assert time.perf_counter() - t0 < 10  # (in-process; the no-op itself is well under 1 s on an idle machine)
    assert snapshot(project / "data") == before


def test_hub_row_through_the_datasets_library(project, tmp_path, monkeypatch):
    """The hub code path with a dataset repository laid out on disk (no network here):
    `datasets.load_dataset` reads a folder exactly as it reads a downloaded hub repo."""
    import datasets.config

    # The CLI runs in this process: `datasets` read HF_DATASETS_CACHE when it was first imported.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "stories_repo" / "data"
    repo.mkdir(parents=True)
    stories = [f"Story number {i} about a brave little {'fox' if i % 2 else 'owl'}." for i in range(40)]
    (repo / "train.jsonl").write_text("".join(json.dumps({"story": s}) + "\n" for s in stories))
    _catalog(project, [f"hubstories,hub,{repo.parent},,story,,,,hub_split=train,0.8/0.1/0.1,true",
                       f"hubwrongfield,hub,{repo.parent},,text,,,,,0.8/0.1/0.1,true"])
    proc = run_cli("prepare", "hubstories", "--no-tokens", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)["hubstories"]
    assert sum(s["documents"] for s in st["splits"].values()) == 40 and st["source"].startswith("hub:")
    assert (tmp_path / "hf_cache").is_dir()  # the datasets cache went to the test's folder
    again = run_cli("prepare", "hubstories", "--no-tokens", cwd=project)
    assert "unchanged, skipped" in again.stdout
    assert_user_error(run_cli("prepare", "hubwrongfield", "--no-tokens", cwd=project), "no column 'text'")



def test_story_themes_file_is_validated_before_any_model_loads(project):
    themes = (REPO / "config" / "story_themes.yaml").read_text()
    (project / "config" / "story_themes.yaml").write_text(themes.replace("{place}", "{planet}")
                                                          .replace("top_p: 0.95", "top_p: 3"))
    before = snapshot(project)
    proc = run_cli("generate-data", "--kind", "stories", "--lines", "3", cwd=project)
    assert_user_error(proc, "unknown placeholder(s) planet", "sampling.top_p")
    assert "base model" not in proc.stdout
    assert snapshot(project) == before
