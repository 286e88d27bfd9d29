"""Property-based tests (hypothesis): config loading, the catalog and CHAT cleaning never
raise anything but a one-line UserError, whatever the input."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_project.config import build_config, load_config, merge_sources
from lora_project.data.catalog import COLUMNS, parse_catalog
from lora_project.data.childes import parse_age, parse_chat, utterance_text
from lora_project.errors import UserError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=20))
config_keys = st.sampled_from(["seed", "lr", "max_steps", "batch_size", "seq_len", "precision", "device", "r",
                               "alpha", "target_modules", "source", "sed", "mlflow", "warmup_steps", "", "x.y"])
sections = st.sampled_from(["training", "lora", "model", "tracking", "trainig", "other"])
config_docs = st.dictionaries(sections, st.one_of(yaml_scalars, st.dictionaries(config_keys, st.one_of(
    yaml_scalars, st.lists(yaml_scalars, max_size=3)), max_size=6)), max_size=4)


def _one_line(exc: UserError) -> None:
    """The CLI prints `error: ` + the message with its whitespace collapsed (one line by
    construction); what can go wrong is an empty message or one that echoes the input at length."""
    line = " ".join(str(exc).split())
    assert line and len(line) <= 600, line[:200]  # 600: the bad-input matrix's MAX_ERROR_CHARS


@SETTINGS
@given(doc=config_docs, overrides=st.lists(st.text(alphabet=string.printable, max_size=30), max_size=3))
def test_config_from_any_mapping_and_overrides_is_valid_or_a_user_error(doc, overrides):
    try:
        cfg = build_config(merge_sources([("doc.yaml", doc)], overrides))
    except UserError as exc:
        _one_line(exc)
        return
    assert cfg.training.lr > 0 and cfg.lora.r >= 1 and cfg.training.batch_size >= 1


@SETTINGS
@given(text=st.text(max_size=300))
def test_config_file_with_any_text_is_valid_or_a_user_error(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config([path], [])
    except UserError as exc:
        _one_line(exc)


cells = st.text(alphabet=string.ascii_letters + string.digits + "._-/;=, \"'\n|" + "é", max_size=15)


@SETTINGS
@given(header=st.lists(st.sampled_from(list(COLUMNS) + ["licence", "", "extra"]), min_size=1, max_size=8),
       rows=st.lists(st.lists(cells, max_size=12), max_size=5))
def test_catalog_from_any_csv_is_valid_or_a_user_error(header, rows):
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    try:
        entries = parse_catalog(buf.getvalue())
    except UserError as exc:
        _one_line(exc)
        return
    for name, e in entries.items():
        assert name == e.name and ".." not in name and "/" not in name
        assert abs(sum(e.split) - 1) < 1e-6


@SETTINGS
@given(text=st.text(max_size=400))
def test_catalog_from_any_text_is_valid_or_a_user_error(text):
    try:
        parse_catalog(text)
    except UserError as exc:
        _one_line(exc)


chat_lines = st.lists(st.one_of(
    st.sampled_from(["@UTF8", "@Begin", "@End", "@Participants:\tCHI Eve Target_Child, MOT Sue Mother",
                     "@ID:\teng|Brown|CHI|1;06.00|female|||Target_Child|||", "@ID:\teng|x|CHI|2;3.04|||||Target_Child||",
                     "@ID:\teng|x|CHI|abc|||||Target_Child||", "%mor:\tn|cookie .", "\tcontinued words ."]),
    st.builds(lambda who, body: f"*{who}:\t{body}", st.sampled_from(["CHI", "MOT", "XYZ", ""]),
              st.text(alphabet=string.ascii_letters + " .?!&=+_^:[]<>()/@0xy\u0015", max_size=40)),
    st.text(max_size=40)), max_size=14)


@SETTINGS
@given(lines=chat_lines)
def test_chat_cleaning_never_raises_anything_but_a_reported_parse_error(lines):
    raw = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    try:
        reader, _ = parse_chat("x.cha", raw)
    except ValueError as exc:  # reported per file by extract_children, with the file name
        assert str(exc).startswith("x.cha")
        return
    for utt in reader.utterances():
        text = utterance_text([t.word for t in utt.tokens or []])
        if text is not None:
            assert text.strip() == text and "\n" not in text and any(c.isalpha() for c in text)
            assert "[" not in text and "\u0015" not in text


@SETTINGS
@given(words=st.lists(st.text(max_size=12), max_size=10))
def test_utterance_text_of_any_tokens(words):
    text = utterance_text(words)
    assert text is None or (text and "\n" not in text and any(c.isalpha() for c in text))


@SETTINGS
@given(text=st.text(max_size=12))
def test_ages_parse_or_refuse(text):
    try:
        months = parse_age(text)
    except UserError as exc:
        _one_line(exc)
        return
    assert 0 <= months


@pytest.mark.parametrize("good", ["1;06", "2;3.04", "3;", "4"])
def test_age_examples(good):
    assert parse_age(good) >= 12
