"""`lora-project profile`: every measure on a hand-computed corpus, MLU against pylangacq on the
shared CHAT transcripts, one word definition for --text and --chat, seeded sampling with the
tiny model, and bad input as exit 2."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA, snapshot

from lora_project.cli import main
from lora_project.profile import metrics

CHAT_FILES = sorted((SHARED_DATA / "childes").rglob("*.cha")) if (SHARED_DATA / "childes").is_dir() else []
needs_chat = pytest.mark.skipif(not CHAT_FILES, reason=f"shared CHAT transcripts not found under {SHARED_DATA}")


def _json(capsys, argv) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------- hand-computed


def test_words_follow_extract_children():
    # Tokens with a letter are words; edge punctuation goes; case is folded.
    assert metrics.words("More cookie! ... 2 mommy's") == ["more", "cookie", "mommy's"]
    assert metrics.words("...") == []
    assert metrics.normalise("More  cookie!") == "more cookie"


def test_profile_of_a_tiny_corpus():
    corpus = ["More cookie!", "mommy want juice.", "daddy go car now.", "...", "ball", "more ball"]
    p = metrics.profile(corpus, top=3)
    # lengths 2, 3, 4, 1, 2 (the "..." holds no word)
    assert p["utterances"] == 5 and p["empty"] == 1 and p["tokens"] == 12
    assert p["mlu_words"] == pytest.approx(12 / 5)
    assert p["mlu_words_sd"] == pytest.approx(math.sqrt(sum((x - 2.4) ** 2 for x in (2, 3, 4, 1, 2)) / 5))
    assert p["one_word_share"] == pytest.approx(1 / 5) and p["two_word_share"] == pytest.approx(2 / 5)
    assert p["vocabulary"] == 10  # more, cookie, mommy, want, juice, daddy, go, car, now, ball
    assert p["top_words"][:2] == [("more", 2), ("ball", 2)]
    assert p["mattr"] == pytest.approx(10 / 12) and p["mattr_window"] == 12  # fewer words than the window: TTR
    assert p["length_counts"] == {"1": 1, "2": 2, "3": 1, "4": 1}
    assert p["brown_stage"] == {"stage": "II", "mlu_range": [2.0, 2.5], "approximate": True,
                                   "from": "mlu_words"}


def test_mattr_moving_window():
    # windows of 3: [a b a] 2/3, [b a c] 3/3, [a c c] 2/3
    assert metrics.mattr(list("abacc"), window=3) == pytest.approx(7 / 9)
    assert metrics.mattr([], window=3) is None


def test_js_divergence():
    assert metrics.js_divergence(Counter(a=3), Counter(a=1)) == 0
    assert metrics.js_divergence(Counter(a=1), Counter(b=5)) == pytest.approx(1.0)
    # P = (1/2, 1/2), Q = (1, 0): JSD = 1.5 - 0.75 log2 3 bits
    assert metrics.js_divergence(Counter(a=1, b=1), Counter(a=2)) == pytest.approx(1.5 - 0.75 * math.log2(3))
    assert metrics.js_divergence(Counter(), Counter(a=1)) is None


def test_novelty():
    index = metrics.TrainingIndex(["more cookie.", "the dog runs to the ball.", "I see a big dog."])
    sampled = ["More cookie!", "the dog runs to the bed", "see a big dog", "dog runs to the ball", "ball", ""]
    nov = metrics.novelty(sampled, index)
    # verbatim: only "more cookie"; of the three 4+-word utterances, "the dog runs to the bed" has an
    # unseen 4-gram (runs to the bed), the other two are made of seen 4-grams.
    assert nov == {"utterances": 5, "verbatim": 1, "verbatim_share": 0.2, "ngram": 4, "long_utterances": 3,
                   "ngram_seen": 2, "ngram_seen_share": pytest.approx(2 / 3)}


def test_brown_stages():
    stage = lambda m: metrics.brown_stage(m, from_morphemes=True)["stage"]  # noqa: E731
    assert [stage(m) for m in (0.5, 1.0, 1.99, 2.0, 2.49, 2.5, 3.0, 3.74, 3.75, 4.49, 4.5, 9)] == \
        ["pre-I", "I", "I", "II", "II", "III", "IV", "IV", "V", "V", "post-V", "post-V"]
    assert metrics.brown_stage(2.2, from_morphemes=False)["approximate"] is True
    assert metrics.brown_stage(None, from_morphemes=True) is None


def test_compare_differences():
    corpus, sampled = ["a b", "a b c d"], ["a b c d e f"]
    cp, sp = metrics.profile(corpus), metrics.profile(sampled)
    out = metrics.compare(sampled, corpus, None, sampled_profile=sp, corpus_profile=cp)
    assert out["mlu_words_diff"] == pytest.approx(6 - 3)
    assert out["mattr_diff"] == pytest.approx(1 - 4 / 6)
    assert out["novelty"] is None and 0 < out["jsd"] < 1


# ---------------------------------------------------------------------------------- CHAT sources


def _without_differing_conventions(path: Path, participant: str = "CHI") -> str:
    """The transcript with only those `participant` utterances where pylangacq's word counting
    and ours agree by definition: kept are utterances that hold a word, have a %mor analysis,
    and contain no compound (``bunny+rabbit``, ``Humpty_Dumpty``: one word for pylangacq, two
    in the lines extract-children writes) and no comma (a word for pylangacq's mluw).
    pylangacq also counts word-less utterances (``xxx .``) in its denominator; they go too."""
    from pylangacq import CHAT

    from lora_project.data.childes import utterance_text

    text = path.read_text(encoding="utf-8").lstrip("\ufeff").replace("\r\n", "\n")
    lines: list[str] = []
    for line in text.split("\n"):  # join wrapped tier lines
        if line.startswith("\t") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    blocks: list[list[str]] = []
    for line in lines:
        if line.startswith("%") and blocks and blocks[-1][0].startswith("*"):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    # (pylangacq also yields a speaker-less entry for some mid-transcript headers: not an utterance line)
    with_mor = [u for u in CHAT.from_strs([text], strict=False).utterances() if u.participant]
    plain = [u for u in CHAT.from_strs([text], strict=False, mor_tier=None, gra_tier=None).utterances()
             if u.participant]
    utterance_blocks = [b for b in blocks if b[0].startswith("*")]
    assert len(utterance_blocks) == len(with_mor) == len(plain)
    drop = set()
    for i, (b, u, p) in enumerate(zip(utterance_blocks, with_mor, plain)):
        if u.participant != participant:
            continue
        ok = (utterance_text([t.word for t in p.tokens]) is not None
              and all(t.pos is not None for t in u.tokens)
              and not any(ch in t.word for t in p.tokens if not t.word.startswith("+") for ch in "+_^")
              and not any(t.word == "," for t in p.tokens))
        if not ok:
            drop.add(id(b))
    return "\n".join(line for b in blocks if id(b) not in drop for line in b) + "\n"


@needs_chat
@pytest.mark.parametrize("path", CHAT_FILES, ids=lambda p: p.name)
def test_chat_mlu_words_equals_pylangacq(path, project, capsys):
    import pylangacq

    # pylangacq's own figure is reported as it is, for the whole transcript
    out = _json(capsys, ["profile", "--chat", str(path), "--json"])
    assert out["pylangacq"]["mluw"] == pytest.approx(pylangacq.read_chat(str(path), strict=False).mluw(n=None)[0])
    # and where the conventions coincide, our MLU in words is pylangacq's mluw()
    common = project / path.name
    common.write_text(_without_differing_conventions(path), encoding="utf-8")
    ours = _json(capsys, ["profile", "--chat", str(common), "--participant", "CHI", "--json"])
    theirs = pylangacq.read_chat(str(common), strict=False).mluw(participant="CHI", n=None)[0]
    assert ours["corpus"]["utterances"] > 0.8 * out["corpus"]["utterances"]  # most utterances kept
    assert ours["corpus"]["mlu_words"] == pytest.approx(theirs, abs=1e-12)


def _pylangacq_words_per_worded_utterance(path: Path, participant: str = "CHI") -> float:
    """pylangacq's words (Token.word, punctuation left out: a token with no letter or digit) per
    utterance of `participant` that holds one, over the whole unmodified transcript."""
    import pylangacq

    counts = [n for u in pylangacq.read_chat(str(path), strict=False).utterances() if u.participant == participant
              if (n := sum(1 for t in u.tokens if any(ch.isalnum() for ch in t.word)))]
    return sum(counts) / len(counts)


@needs_chat
@pytest.mark.parametrize("path", CHAT_FILES, ids=lambda p: p.name)
def test_mlu_words_chat_equals_pylangacq_words_over_worded_utterances(path, capsys):
    """Issue 31: MLU in words by CHAT conventions (a compound such as bunny+rabbit or Humpty_Dumpty is
    one word, fillers and fragments none) on the whole transcript, against pylangacq, to 1e-9; the
    text-word MLU (what the model sees) stays beside it, and the Brown stage reads the CHAT figure
    only when there is no %mor."""
    out = _json(capsys, ["profile", "--chat", str(path), "--json"])["corpus"]
    assert out["mlu_words_chat"] == pytest.approx(_pylangacq_words_per_worded_utterance(path), abs=1e-9)
    assert out["mlu_words"] >= out["mlu_words_chat"]  # compounds split in the text, never joined
    assert out["brown_stage"]["from"] == ("mlu_morphemes" if out["mlu_morphemes"] is not None else "mlu_words_chat")


def test_brown_stage_comes_from_chat_words_without_mor_and_text_words_for_text(project, capsys):
    cha = project / "t.cha"
    cha.write_text("@UTF8\n@Begin\n@Participants:\tCHI Target_Child\n"
                   "*CHI:\tbunny+rabbit go@o &-uh home .\n*CHI:\tHumpty_Dumpty fall .\n*CHI:\txxx .\n@End\n")
    chat = _json(capsys, ["profile", "--chat", str(cha), "--json"])["corpus"]
    assert chat["mlu_morphemes"] is None
    assert chat["mlu_words_chat"] == pytest.approx(2.5)  # (3 + 2) / 2: the filler and the word-less line out
    assert chat["mlu_words"] == pytest.approx(3.5)  # the text the model sees: bunny rabbit go home / Humpty Dumpty fall
    assert chat["brown_stage"] == {"stage": "III", "mlu_range": [2.5, 3.0], "approximate": True,
                                   "from": "mlu_words_chat"}
    (project / "u.txt").write_text("bunny rabbit go home\nHumpty Dumpty fall\n")
    text = _json(capsys, ["profile", "--text", str(project / "u.txt"), "--json"])["corpus"]
    assert text["mlu_words_chat"] is None and text["brown_stage"]["from"] == "mlu_words"


def test_a_dataset_built_from_chat_keeps_its_chat_word_counts(project, capsys):
    path = project / "config" / "dataset_catalog.csv"
    head = path.read_text().splitlines()[0]
    path.write_text(f"{head}\nchild,childes,data/childes/child,,,,,,,0.34/0.33/0.33,true\n")
    folder = project / "data" / "childes" / "child"
    folder.mkdir(parents=True)
    body = "".join(f"*CHI:\tbunny+rabbit go {w} .\n*CHI:\t{w} please .\n" for w in
                   ("home", "out", "up", "down", "in", "away", "back", "there", "here", "now", "on", "off"))
    (folder / "a.cha").write_text("@UTF8\n@Begin\n@Participants:\tCHI Target_Child\n" + body + "@End\n")
    assert main(["prepare", "child", "--no-tokens"]) == 0
    capsys.readouterr()
    out = _json(capsys, ["profile", "--dataset", "child", "--split", "train", "--json"])["corpus"]
    chat_counts = {"bunny rabbit": 3, "please": 2}
    lines = (project / "data" / "processed" / "child" / "train.txt").read_text().splitlines()
    expected = [next(n for k, n in chat_counts.items() if k in line) for line in lines]
    assert out["mlu_words_chat"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert out["brown_stage"]["from"] == "mlu_words_chat"


@needs_chat
@pytest.mark.parametrize("path", CHAT_FILES, ids=lambda p: p.name)
def test_text_of_extract_children_has_the_same_profile_as_chat(path, project, capsys):
    lines = project / f"{path.stem}.txt"
    assert main(["extract-children", str(path), "--out", str(lines), "--json"]) == 0
    extracted = json.loads(capsys.readouterr().out)
    chat = _json(capsys, ["profile", "--chat", str(path), "--json"])["corpus"]
    text = _json(capsys, ["profile", "--text", str(lines), "--json"])["corpus"]
    for key in ("utterances", "tokens", "vocabulary", "mlu_words", "mattr", "one_word_share", "top_words"):
        assert text[key] == chat[key], key
    assert chat["mlu_words"] == pytest.approx(extracted["per_file"][0]["mlu_words"], abs=1e-3)
    assert chat["mlu_morphemes"] >= chat["mlu_words"] and chat["brown_stage"]["approximate"] is False
    assert text["mlu_morphemes"] is None and text["brown_stage"]["approximate"] is True


def test_chat_morphemes_on_a_written_transcript(project, capsys):
    cha = project / "t.cha"
    cha.write_text("@UTF8\n@Begin\n@Languages:\teng\n@Participants:\tCHI Target_Child, MOT Mother\n"
                   "@ID:\teng|x|CHI|2;00.00||||Target_Child|||\n@ID:\teng|x|MOT|||||Mother|||\n"
                   "*CHI:\tdogs running .\n%mor:\tn|dog-PL part|run-PRESP .\n"
                   "*CHI:\tI'm here .\n%mor:\tpro:sub|I~v|be&1S adv|here .\n"
                   "*CHI:\txxx .\n"
                   "*MOT:\tyes you are .\n%mor:\tco|yes pro|you v|be&PRES .\n@End\n")
    out = _json(capsys, ["profile", "--chat", str(cha), "--json"])
    # words 2 + 2 over 2 utterances (xxx holds none); morphemes dog-PL run-PRESP = 4, I ~be here = 3
    assert out["corpus"]["mlu_words"] == 2.0 and out["corpus"]["utterances"] == 2
    assert out["corpus"]["mlu_morphemes"] == 3.5
    assert out["corpus"]["brown_stage"]["stage"] == "IV" and not out["corpus"]["brown_stage"]["approximate"]
    mot = _json(capsys, ["profile", "--chat", str(cha), "--participant", "MOT", "--json"])
    assert mot["corpus"]["mlu_words"] == 3.0


# ---------------------------------------------------------------------------------- sampling


@pytest.mark.slow  # several trainings in one test: kept out of make test-fast's 2 minutes
def test_sampling_is_seeded_and_logged_to_the_training_run(project, tracking_store, capsys):
    from mlflow.tracking import MlflowClient

    from lora_project.models.adapter import read_metadata

    assert main(["train", "toddler_data", "--no-progress"]) == 0
    capsys.readouterr()
    argv = ["profile", "--dataset", "toddler_data", "--adapter", "adapters/toddler_data_lora",
            "--samples", "6", "--seed", "3", "--max-new-tokens", "8", "--json"]
    first = _json(capsys, argv)
    again = _json(capsys, argv)
    assert first["models"].keys() == {"base", "toddler_data_lora"}
    for model in ("base", "toddler_data_lora"):
        a, b = Path(first["files"][f"samples_{model}"]), Path(again["files"][f"samples_{model}"])
        assert a != b and a.read_text() == b.read_text() and len(a.read_text().splitlines()) == 6
        assert first["models"][model] == again["models"][model]
        assert "\n" not in "".join(a.read_text().splitlines())
    # prompts are corpus utterance starts: each sample begins with a word of the test split
    starts = {u.split()[0] for u in (project / "data/processed/toddler_data/test.txt").read_text().splitlines() if u}
    for line in Path(first["files"]["samples_base"]).read_text().splitlines():
        assert any(line.startswith(s) for s in starts), line
    assert first["baseline"]["utterances"] > 0 and first["baseline"]["what"].startswith("the corpus's test split")
    assert Path(first["files"]["plot"]).stat().st_size > 1000
    saved = json.loads(Path(first["files"]["json"]).read_text())
    assert saved["models"]["toddler_data_lora"]["mlu_words"] == first["models"]["toddler_data_lora"]["mlu_words"]
    run_id = read_metadata(project / "adapters/toddler_data_lora").mlflow_run_id
    assert first["mlflow_runs"] == [run_id]
    logged = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db").get_run(run_id).data.metrics
    assert logged["profile_mlu_words"] == pytest.approx(first["models"]["toddler_data_lora"]["mlu_words"])


def test_prompts_are_drawn_with_the_seed():
    from lora_project.profile.sample import draw_prompts, first_utterance

    corpus = [f"w{i} rest" for i in range(50)]
    assert draw_prompts(corpus, 5, seed=3) == draw_prompts(corpus, 5, seed=3)
    assert draw_prompts(corpus, 5, seed=3) != draw_prompts(corpus, 5, seed=4)
    assert set(draw_prompts(corpus, 20, seed=0)) <= {f"w{i}" for i in range(50)}
    assert draw_prompts(corpus, 2, seed=0, mode="empty") == ["", ""]
    assert first_utterance("more", " cookie.\nwhere ball") == "more cookie."
    assert first_utterance("", "a\x1cb") == "a" and first_utterance("", "\n") == ""


def test_empty_prompts(project, capsys):
    assert main(["prepare", "toddler_data"]) == 0
    capsys.readouterr()
    out = _json(capsys, ["profile", "--dataset", "toddler_data", "--base", "--samples", "3", "--prompts", "empty",
                         "--max-new-tokens", "6", "--json"])
    assert out["sampling"]["prompts"] == "empty" and list(out["models"]) == ["base"]
    assert out["models"]["base"]["novelty"]["ngram"] == 4


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, fragment", [
    ([], "exactly one source"),
    (["--text", "a.txt", "--dataset", "toddler_data"], "exactly one source"),
    (["--text", "missing.txt"], "file not found"),
    (["--chat", "missing.cha"], "not found"),
    (["--dataset", "nope"], "not prepared"),
    (["--dataset", "../x"], "dataset name"),
    (["--text", "utts.txt", "--adapter", "adapters/x_lora"], "--adapter needs --dataset"),
    (["--dataset", "toddler_data", "--adapter", "adapters/x_lora"], "adapter folder not found"),
    (["--dataset", "toddler_data", "--base", "--samples", "0"], "--samples: must be an integer from 1"),
    (["--dataset", "toddler_data", "--samples", "5"], "--samples needs --adapter"),
    (["--text", "blank.txt"], "no utterances"),
    (["--chat", "t.cha", "--participant", "XYZ"], "no utterances of XYZ"),
    (["--dataset", "toddler_data", "--base", "--temperature", "0"], "--temperature"),
    (["--text", "utts.txt", "--split", "dev"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(project, capsys, argv, fragment):
    (project / "utts.txt").write_text("more cookie\n")
    (project / "blank.txt").write_text("\n \n")
    (project / "t.cha").write_text("@UTF8\n@Begin\n@Participants:\tCHI Target_Child\n*CHI:\tmore cookie .\n@End\n")
    (project / "data/processed/toddler_data").mkdir(parents=True)
    (project / "data/processed/toddler_data/stats.json").write_text('{"separator": "\\n"}')
    for split in ("train", "validation", "test"):
        (project / f"data/processed/toddler_data/{split}.txt").write_text("more cookie\nwhere ball\n")
    before = snapshot(project)
    capsys.readouterr()
    with pytest.raises(SystemExit) if fragment == "invalid choice" or "must be" in fragment or "--temp" in fragment \
            else _nothing():
        assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
    assert snapshot(project) == before


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_within_train_baseline_lets_repeats_straddle():
    from lora_project.profile.report import within_train_baseline

    same = within_train_baseline(["more cookie."] * 30, seed=0)
    assert same["utterances"] == 3 and same["verbatim_share"] == 1.0
    distinct = within_train_baseline([f"w{i} x" for i in range(30)], seed=0)
    assert distinct["verbatim_share"] == 0.0
    assert within_train_baseline([f"w{i % 7} x" for i in range(50)], seed=1) == \
        within_train_baseline([f"w{i % 7} x" for i in range(50)], seed=1)


def test_chunked_sampling_gives_the_same_samples(project):
    from lora_project.config import load_project_config
    from lora_project.models.base_model import load_base
    from lora_project.paths import ProjectPaths
    from lora_project.profile.sample import sample_utterances

    cfg = load_project_config(ProjectPaths.discover())
    base = load_base(cfg)
    prompts = ["more", "the", "", "baby", "where"]
    lines = []
    whole = sample_utterances(cfg, [], prompts, seed=5, max_new_tokens=5, base=base)
    chunked = sample_utterances(cfg, [], prompts, seed=5, max_new_tokens=5, base=base, chunk=2, log=lines.append)
    assert whole == chunked and list(whole) == ["base"] and len(whole["base"]) == 5
    assert lines == ["sampling base: 2/5", "sampling base: 4/5", "sampling base: 5/5"]


def test_profile_text_through_the_cli(project):
    from conftest import run_cli

    (project / "utts.txt").write_text("more cookie\nwhere ball\nthe dog runs fast\n")
    proc = run_cli("profile", "--text", "utts.txt", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    text = json.dumps(out)
    assert '"mlu_words": 2.6666666666666665' in text or '"mlu_words": 2.667' in text, text[:800]
