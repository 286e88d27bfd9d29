"""`lora-project profile`: the child-language profile of a corpus and of what adapters say.

Corpus only (``--dataset``/``--text``/``--chat``): utterances, words, vocabulary, MLU, MATTR,
one- and two-word shares, top words, Brown stage. With ``--adapter`` (and ``--dataset``):
utterances sampled from the base and from each adapter get the same profile plus their
distance to the corpus (MLU and MATTR differences, Jensen-Shannon divergence of word
distributions) and their novelty against the training split, next to the chance baseline:
the corpus's own test split against its train split.

Writes ``outputs/metrics/profile_<source>_<time>.json``, the samples beside it as
``..._<model>.txt`` (one utterance per line) and ``..._mlu.png``; adds the adapters' figures
to their MLflow training runs (run id from the adapter's metadata).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_project.errors import UserError
from lora_project.profile import metrics
from lora_project.profile.sample import draw_prompts, sample_utterances
from lora_project.profile.sources import Corpus, chat_files, dataset_split, text_file
from lora_project.utils.plotting import save_figure

DEFAULT_SAMPLES = 200


@dataclass
class ProfileRequest:
    """What to profile (exactly one source) and how to sample."""
    dataset: str | None = None
    split: str = "test"
    text: Path | None = None
    chat: Path | None = None
    participant: str = "CHI"
    encoding: str = "utf-8"
    adapters: list[Path] = field(default_factory=list)
    samples: int | None = None        # None: DEFAULT_SAMPLES when adapters are given, else no sampling
    base: bool = False                # sample the base model even without adapters
    seed: int = 0
    prompts: str = "start"            # "start": a corpus utterance's first word; "empty": nothing
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top: int = 20
    config_files: list[Path] | None = None   # None: config/model_config.yaml + config/training_config.yaml
    overrides: list[str] = field(default_factory=list)
    mlflow: bool = True
    log: object = None                # progress lines (e.g. print to stderr); None: silent


def check_request(req: ProfileRequest) -> None:
    """Every problem with the request as a one-line UserError, before any work."""
    sources = [s for s in (req.dataset, req.text, req.chat) if s is not None]
    if len(sources) != 1:
        raise UserError("give exactly one source: --dataset NAME, --text FILE or --chat FILE_OR_FOLDER")
    if req.adapters and req.dataset is None:
        raise UserError("--adapter needs --dataset NAME (prompts and novelty come from its splits)")
    if req.base and req.dataset is None:
        raise UserError("--base needs --dataset NAME (prompts and novelty come from its splits)")
    if req.samples is not None and req.samples < 1:
        raise UserError(f"--samples must be at least 1, got {req.samples}")
    if req.samples is not None and not (req.adapters or req.base):
        raise UserError("--samples needs --adapter DIR or --base")
    if req.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {req.max_new_tokens}")
    if req.top < 1:
        raise UserError(f"--top must be at least 1, got {req.top}")


def load_corpus(paths, req: ProfileRequest) -> Corpus:
    if req.dataset is not None:
        return dataset_split(paths, req.dataset, req.split)
    if req.text is not None:
        return text_file(req.text, req.encoding)
    return chat_files(req.chat, req.participant, req.encoding)


def _label(corpus: Corpus) -> str:
    src = corpus.source
    raw = src.get("dataset") or Path(src["path"]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._") or "corpus"


def _out_stem(paths, label: str) -> Path:
    """outputs/metrics/profile_<label>_<time>, never an existing name."""
    stem = f"profile_{label}_{time.strftime('%Y%m%d-%H%M%S')}"
    out, i = paths.metrics_dir / stem, 1
    while out.with_suffix(".json").exists():
        i += 1
        out = paths.metrics_dir / f"{stem}-{i}"
    return out


def run_profile(paths, req: ProfileRequest) -> dict:
    """Profile the source, sample and compare models if asked, save JSON/samples/plot, log to MLflow."""
    check_request(req)
    adapters = [Path(a) for a in req.adapters]
    if adapters:
        from lora_project.models.adapter import checked_adapters

        adapters = checked_adapters(adapters)  # before any work: complete folders, distinct names
    corpus = load_corpus(paths, req)
    corpus_profile = metrics.profile(corpus.utterances, top=req.top, mlu_morphemes=corpus.mlu_morphemes,
                                     chat_words=corpus.chat_words)
    report: dict = {"source": corpus.source, "label": corpus.label, "mattr_window": metrics.MATTR_WINDOW,
                    "corpus": corpus_profile}
    if corpus.pylangacq:
        report["pylangacq"] = corpus.pylangacq
    if req.dataset is not None:
        train = dataset_split(paths, req.dataset, "train").utterances
        index = metrics.TrainingIndex(train)
        test = corpus.utterances if req.split == "test" else dataset_split(paths, req.dataset, "test").utterances
        report["baseline"] = {"what": "the corpus's test split against its train split",
                              "train_utterances": len(train), **metrics.novelty(test, index)}
        report["baseline_within_train"] = within_train_baseline(train, req.seed)
    samples: dict[str, list[str]] = {}
    if adapters or req.base:
        from lora_project.config import load_config

        cfg = load_config(req.config_files or [paths.model_config, paths.training_config], req.overrides)
        n = req.samples or DEFAULT_SAMPLES
        prompts = draw_prompts(corpus.utterances, n, req.seed, req.prompts)
        t0 = time.perf_counter()
        samples = sample_utterances(cfg, adapters, prompts, seed=req.seed, max_new_tokens=req.max_new_tokens,
                                    temperature=req.temperature, top_p=req.top_p, log=req.log)
        report["sampling"] = {"samples": n, "seed": req.seed, "prompts": req.prompts,
                              "max_new_tokens": req.max_new_tokens, "temperature": req.temperature,
                              "top_p": req.top_p, "seconds": round(time.perf_counter() - t0, 1),
                              "adapters": [str(a) for a in adapters]}
        report["models"] = {}
        for name, utts in samples.items():
            prof = metrics.profile(utts, top=req.top)
            report["models"][name] = {**prof, **metrics.compare(utts, corpus.utterances, index,
                                                                  sampled_profile=prof, corpus_profile=corpus_profile)}
    report["files"] = save(paths, report, samples, _out_stem(paths, _label(corpus)))
    if adapters and req.mlflow and cfg.tracking.mlflow:
        report["mlflow_runs"] = log_to_adapter_runs(paths, cfg, adapters, report["models"])
    return report


def log_to_adapter_runs(paths, cfg, adapters: list[Path], models: dict) -> list[str]:
    """Add each adapter's profile figures to its own training run (run id from its metadata)."""
    from lora_project.models.adapter import read_metadata
    from lora_project.utils.mlflow_utils import log_to_runs

    by_run = {}
    for a in adapters:
        run_id = read_metadata(a).mlflow_run_id
        if run_id:
            by_run[run_id] = mlflow_metrics(models[a.name])
    return (log_to_runs(paths, cfg.tracking.tracking_uri, by_run) or []) if by_run else []


def within_train_baseline(train: list[str], seed: int, share: float = 0.1) -> dict:
    """Novelty of a seeded random `share` of the train utterances against the rest.

    The splits of ``prepare`` put identical documents in one split, so the test split never
    repeats a train utterance exactly (only up to case and punctuation): its verbatim share
    understates how often the source repeats itself. Here repeats can straddle the two parts,
    as they do between a model's samples and its training data.
    """
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    k = max(1, int(len(train) * share))
    held, rest = [train[i] for i in order[:k]], [train[i] for i in order[k:]]
    return {"what": f"a random {share:.0%} of the train split's utterances (seed {seed}) against the other "
                    f"{1 - share:.0%}", **metrics.novelty(held, metrics.TrainingIndex(rest))}


def mlflow_metrics(model: dict) -> dict[str, float]:
    """The figures an adapter's training run gets (None values left out)."""
    nov = model.get("novelty") or {}
    values = {"profile_mlu_words": model.get("mlu_words"), "profile_mattr": model.get("mattr"),
              "profile_jsd": model.get("jsd"), "profile_verbatim_share": nov.get("verbatim_share"),
              "profile_ngram_seen_share": nov.get("ngram_seen_share")}
    return {k: float(v) for k, v in values.items() if v is not None}


def save(paths, report: dict, samples: dict[str, list[str]], stem: Path) -> dict:
    """The JSON, one text file of samples per model and the MLU plot; returns their paths."""
    from lora_project.utils.io_utils import atomic_write_json, atomic_write_text

    stem.parent.mkdir(parents=True, exist_ok=True)
    files = {"json": str(stem.with_suffix(".json"))}
    for name, utts in samples.items():
        path = stem.parent / f"{stem.name}_{name}.txt"
        atomic_write_text(path, "".join(u + "\n" for u in utts))
        files[f"samples_{name}"] = str(path)
    plot = plot_lengths(report, stem.parent / f"{stem.name}_mlu.png")
    if plot:
        files["plot"] = str(plot)
    atomic_write_json(stem.with_suffix(".json"), {**report, "files": files})
    return files


def plot_lengths(report: dict, out: Path | None = None):
    """Utterance lengths (words) of the corpus, the base and each adapter: share of utterances per length.

    Saved to `out` when given (returns the path), else the figure is returned (notebooks).
    """
    import matplotlib

    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {f"corpus ({report['label']})": report["corpus"]}
    series.update(report.get("models", {}))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    longest = max((int(k) for s in series.values() for k in s["length_counts"]), default=1)
    top = min(longest, 20)
    for name, prof in series.items():
        counts = {int(k): v for k, v in prof["length_counts"].items()}
        total = sum(counts.values()) or 1
        xs = list(range(1, top + 1))
        ys = [counts.get(x, 0) / total for x in xs]
        ys[-1] += sum(v for k, v in counts.items() if k > top) / total
        mlu = prof.get("mlu_words")
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} (MLU {mlu:.2f})" if mlu is not None else name)
    ax.set_xlabel(f"utterance length in words (last point: {top} or more)")
    ax.set_ylabel("share of utterances")
    ax.set_title("Utterance lengths: corpus, base and adapters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if out is None:
        return fig
    return save_figure(fig, out, dpi=100)


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def format_report(report: dict) -> str:
    """The terminal table: corpus, baseline, base and adapters."""
    c = report["corpus"]
    cols = ["", "utts", "MLU-w", "MLU-wc", "MLU-m", f"MATTR{report['mattr_window']}", "1-word", "2-word", "vocab",
            "JSD", "verbatim", "4g-seen", "stage"]

    def stage(p):
        s = p.get("brown_stage")
        return "-" if not s else s["stage"] + ("~" if s["approximate"] else "")

    def row(name, p, nov=None, jsd=None):
        return [name, str(p["utterances"]), _f(p["mlu_words"]), _f(p.get("mlu_words_chat")), _f(p.get("mlu_morphemes")),
                _f(p["mattr"], ".3f"),
                _f(p["one_word_share"], ".0%"), _f(p["two_word_share"], ".0%"), str(p["vocabulary"]), _f(jsd, ".3f"),
                _f(nov and nov["verbatim_share"], ".0%"), _f(nov and nov["ngram_seen_share"], ".0%"), stage(p)]

    rows = [row(f"corpus {report['label']}", c, report.get("baseline"))]
    if "baseline_within_train" in report:
        w = report["baseline_within_train"]
        rows.append(["  train 10% vs 90%"] + [""] * 9 + [_f(w["verbatim_share"], ".0%"),
                                                    _f(w["ngram_seen_share"], ".0%"), ""])
    for name, p in report.get("models", {}).items():
        rows.append(row(name, p, p.get("novelty"), p.get("jsd")))
    widths = [max(len(r[i]) for r in [cols] + rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in [cols] + rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = ["MLU-w: words of the text, as a model sees and samples it (compounds split; the corpus-vs-model "
             "figure); MLU-wc: words by CHAT conventions (a compound one word, fillers none; CHAT sources only); "
             "MLU-m: morphemes (%mor).",
             "stage: Brown (1973) from MLU-m; ~ = approximate, read from MLU-wc, else from MLU-w.",
             "JSD: Jensen-Shannon divergence (bits) of word distributions vs the corpus."]
    if "baseline" in report:
        notes.append("verbatim / 4g-seen: share found in the train split (utterances / utterances of 4+ words whose "
                     "4-grams all occur); the corpus rows are the chance baselines: test vs train, and a random "
                     "10% of train vs the rest (identical lines never straddle prepare's splits).")
    if "pylangacq" in report:
        pl = report["pylangacq"]
        notes.append(f"pylangacq (n=None, all {pl['utterances']} utterances): mluw {_f(pl['mluw'], '.3f')}, "
                     f"mlum {_f(pl['mlum'], '.3f')}")
    tops = [f"top words {report['label']}: " + ", ".join(w for w, _ in c["top_words"][:10])]
    for name, p in report.get("models", {}).items():
        tops.append(f"top words {name}: " + ", ".join(w for w, _ in p["top_words"][:10]))
    return "\n".join(lines + [""] + notes + tops + ["", "wrote " + ", ".join(report["files"].values())])


def summary_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)
