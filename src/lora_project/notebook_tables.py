"""Tables and figures for the notebooks (and anyone scripting an analysis).

Every function reads what the other commands wrote (``data/processed``, MLflow,
``adapters/``, ``outputs/metrics``) and returns plain Python objects or pandas DataFrames;
the plotting helpers return matplotlib figures. When nothing is there yet they raise
`NothingYet`, whose message says which command produces the missing piece; notebooks
print it instead of failing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from lora_project.errors import UserError
from lora_project.paths import ProjectPaths
from lora_project.utils.logging_utils import quiet_libraries

quiet_libraries()  # notebooks import this module first: no library progress bars or INFO logs

_WORD = re.compile(r"[A-Za-z']+")


class NothingYet(UserError):
    """The artefact a report needs does not exist yet (the message names the command to run)."""


def prepared_datasets(paths: ProjectPaths) -> list[str]:
    """Names of the prepared datasets (NothingYet when there are none)."""
    names = sorted(p.name for p in paths.processed_dir.glob("*") if (p / "stats.json").is_file()) \
        if paths.processed_dir.is_dir() else []
    if not names:
        raise NothingYet("no prepared datasets yet; run: lora-project prepare --all (or make demo)")
    return names


def _stats(paths: ProjectPaths, name: str) -> dict:
    from lora_project.data.preprocessor import read_stats

    return read_stats(paths.processed(name))


def dataset_sizes(paths: ProjectPaths):
    """One row per dataset and split: documents, tokens (when counted), UTF-8 bytes, characters."""
    import pandas as pd

    rows = []
    for name in prepared_datasets(paths):
        for split, s in _stats(paths, name)["splits"].items():
            rows.append({"dataset": name, "split": split, "documents": s["documents"], "tokens": s.get("tokens"),
                         "bytes": s["bytes"], "characters": s["characters"]})
    return pd.DataFrame(rows)


def documents(paths: ProjectPaths, name: str, split: str = "train") -> list[str]:
    """Documents of one prepared split."""
    from lora_project.data.preprocessor import read_split

    return read_split(paths.processed(name), split)


def words(text: str) -> list[str]:
    """Lower-cased word tokens of a text."""
    return [w.lower() for w in _WORD.findall(text)]


def length_distributions(paths: ProjectPaths, split: str = "train") -> dict[str, list[int]]:
    """Document lengths in words, per dataset."""
    return {n: [len(words(d)) for d in documents(paths, n, split)] for n in prepared_datasets(paths)}


def top_words(paths: ProjectPaths, name: str, n: int = 20, split: str = "train") -> list[tuple[str, int]]:
    """The n most frequent words of a prepared split."""
    counts = Counter(w for d in documents(paths, name, split) for w in words(d))
    return counts.most_common(n)


def vocabulary_overlap(paths: ProjectPaths, split: str = "train"):
    """Jaccard overlap of the word vocabularies of every pair of datasets (a square DataFrame)."""
    import pandas as pd

    names = prepared_datasets(paths)
    vocab = {n: {w for d in documents(paths, n, split) for w in words(d)} for n in names}
    return pd.DataFrame([[len(vocab[a] & vocab[b]) / max(1, len(vocab[a] | vocab[b])) for b in names]
                         for a in names], index=names, columns=names)


def childes_files(paths: ProjectPaths):
    """Per-file ages, utterances and mean length of utterance (words) of prepared CHILDES rows."""
    import pandas as pd

    rows = []
    for name in prepared_datasets(paths):
        info = _stats(paths, name).get("extraction") or {}
        for f in info.get("per_file", []):
            rows.append({"dataset": name, "file": Path(f["file"]).name, "age": ", ".join(
                f"{k} {v}" for k, v in f["ages"].items() if v) or None, "age_months": f.get("age_months"),
                "utterances": f["utterances"], "lines": f["lines"], "mlu_words": f.get("mlu_words"),
                "mlu_words_chat": f.get("mlu_words_chat"),
                "skipped": f.get("skipped")})
    if not rows:
        raise NothingYet("no CHILDES dataset prepared; put .cha files in data/childes/, enable the 'childes' "
                         "catalog row and run: lora-project prepare childes")
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ MLflow runs


def _client(paths: ProjectPaths, tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    from lora_project.utils.mlflow_utils import resolve_tracking_uri

    uri = resolve_tracking_uri(paths, tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise NothingYet(f"no MLflow database at {uri}; train an adapter first (make demo)")
    return MlflowClient(tracking_uri=uri)


def training_runs(paths: ProjectPaths, tracking_uri: str | None = None):
    """Finished and failed training runs of every experiment (newest first): params, final metrics."""
    import pandas as pd

    client = _client(paths, tracking_uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time DESC"],
                              max_results=500) if exps else []
    runs = [r for r in runs if "training.lr" in r.data.params]
    if not runs:
        raise NothingYet("no training runs in MLflow yet; run: lora-project train <dataset> (or make demo)")
    rows = []
    for r in runs:
        rows.append({"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                     "dataset": r.data.params.get("dataset"), "lora.r": r.data.params.get("lora.r"),
                     "training.lr": r.data.params.get("training.lr"),
                     "training.max_steps": r.data.params.get("training.max_steps"),
                     **{k: v for k, v in r.data.metrics.items() if not k.startswith("system/")}})
    return pd.DataFrame(rows)


def metric_history(paths: ProjectPaths, run_id: str, key: str, tracking_uri: str | None = None):
    """(step, value) pairs of one metric of one run."""
    import pandas as pd

    hist = _client(paths, tracking_uri).get_metric_history(run_id, key)
    return pd.DataFrame([(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)], columns=["step", key])


def run_config(paths: ProjectPaths, run_id: str, tracking_uri: str | None = None) -> dict:
    """The resolved config of a run, as logged (flattened `section.key` params)."""
    return dict(sorted(_client(paths, tracking_uri).get_run(run_id).data.params.items()))


def plot_runs(paths: ProjectPaths, run_ids: list[str], keys=("loss", "val_loss", "lr", "tokens_per_second"),
              tracking_uri: str | None = None):
    """One panel per metric, one line per run."""
    import matplotlib.pyplot as plt

    client = _client(paths, tracking_uri)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for rid in run_ids:
            df = metric_history(paths, rid, key, tracking_uri)
            if len(df):
                ax.plot(df["step"], df[key], marker="." if len(df) < 30 else None,
                        label=client.get_run(rid).info.run_name)
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ results


def latest_metrics(paths: ProjectPaths, prefix: str) -> dict:
    """The newest outputs/metrics/<prefix>_*.json."""
    files = sorted(paths.metrics_dir.glob(f"{prefix}_*.json")) if paths.metrics_dir.is_dir() else []
    if not files:
        raise NothingYet(f"no outputs/metrics/{prefix}_*.json yet")
    return json.loads(files[-1].read_text())


def latest_pairs(paths: ProjectPaths) -> dict:
    """The newest `evaluate --pairs` result (outputs/metrics/minimal_pairs_*.json)."""
    try:
        return latest_metrics(paths, "minimal_pairs")
    except NothingYet:
        raise NothingYet("no minimal-pair results yet; run: lora-project evaluate --pairs "
                         "../shared/data/blimp --limit 20 --adapter adapters/<name>") from None


def pairs_accuracy(paths: ProjectPaths):
    """Per-paradigm minimal-pair accuracy of base and adapters from the newest `evaluate --pairs`."""
    import pandas as pd

    res = latest_pairs(paths)
    table = pd.DataFrame({m: {u: p["accuracy"] for u, p in r["paradigms"].items()} for m, r in res["models"].items()})
    table.loc["macro average"] = [res["models"][m]["macro_accuracy"] for m in table.columns]
    return table


def pairs_change(result: dict):
    """Each adapter's change in minimal-pair accuracy against the base per field and macro average,
    with 95% intervals and McNemar p-values (a DataFrame; see `evaluation.pair_report.pairs_change`)."""
    from lora_project.evaluation.pair_report import pairs_change as table

    return table(result)


def plot_pairs_change(result: dict):
    """The change per field against the base with 95% intervals, one marker per adapter (a figure)."""
    from lora_project.evaluation.pair_report import pairs_change_figure

    return pairs_change_figure(result)


def plot_pairs(table):
    """Bar chart of per-paradigm accuracy, one bar per model (see `plot_pairs_change` for the effect)."""
    import matplotlib.pyplot as plt

    body = table.drop(index="macro average")
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(body) + 1.5))
    body.plot.barh(ax=ax, width=0.8)
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("accuracy (chance = 0.5)")
    fig.tight_layout()
    return fig


def adapter_names(paths: ProjectPaths) -> list[str]:
    """Names of the sound adapters under adapters/ (NothingYet when there are none)."""
    from lora_project.models.lora_factors import list_adapters

    rows = list_adapters(paths.adapters_dir) if paths.adapters_dir.is_dir() else []
    ok = [r["name"] for r in rows if r["status"] == "ok"]
    if not ok:
        raise NothingYet("no trained adapters yet; run: lora-project train <dataset> (or make demo)")
    return ok


def weight_report(paths: ProjectPaths, name: str) -> dict:
    """`lora-project inspect weights` as a dict (relative update needs the base model's weights)."""
    from lora_project.inspection.analysis import analyse_weights
    from lora_project.models.lora_factors import BaseWeights, load_adapter, require_plain_lora

    adapter = require_plain_lora(load_adapter(paths.adapters_dir / name), "weight analysis")
    try:
        base = BaseWeights(adapter.base_directory) if adapter.base_directory is not None else None
    except UserError:
        base = None  # the base folder moved: norms and spectra still work, relative updates not
    return analyse_weights(adapter, base)


def plot_weight_report(report: dict):
    """Heatmap of the relative update (layers x modules) and the singular-value spectra."""
    import matplotlib.pyplot as plt
    import numpy as np

    mods = report["modules"]
    layers = sorted({m["layer"] for m in mods if m.get("layer") is not None})
    kinds = sorted({m["module"] for m in mods})
    key = "relative_update" if any(m.get("relative_update") is not None for m in mods) else "delta_fro_norm"
    grid = np.full((len(layers), len(kinds)), np.nan)
    for m in mods:
        if m.get("layer") is not None and m.get(key) is not None:
            grid[layers.index(m["layer"]), kinds.index(m["module"])] = m[key]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.25 * len(layers) + 2.5))
    im = a1.imshow(grid, aspect="auto", cmap="viridis")
    a1.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    a1.set_yticks(range(len(layers)), layers)
    a1.set_ylabel("layer")
    a1.set_title(key.replace("_", " "))
    fig.colorbar(im, ax=a1)
    for m in mods:
        sv = m["singular_values"]
        a2.semilogy(range(1, len(sv) + 1), [max(v, 1e-12) for v in sv], lw=0.7, alpha=0.6)
    a2.set_xlabel("index")
    a2.set_title("singular values of each module's update")
    fig.tight_layout()
    return fig


def attempt(fn, *args, **kwargs):
    """Call a report; when its input does not exist yet, print what to run and return None."""
    try:
        return fn(*args, **kwargs)
    except NothingYet as exc:
        print(f"nothing to show yet: {exc}")
        return None


def cross_evaluation(paths: ProjectPaths, max_tokens: int = 1000, split: str = "test"):
    """(matrix, heatmap figure): the newest `benchmark --matrix` result, else computed now
    (base and every adapter on every prepared dataset, capped at `max_tokens` per dataset; 0 = whole
    splits; the figure's title says which). The heatmap shows each adapter's change against the base."""
    from lora_project.benchmark import cross_matrix, matrix_figure
    from lora_project.config import load_project_config

    prepared_datasets(paths)
    try:
        matrix = latest_metrics(paths, "benchmark").get("matrix")
    except NothingYet:
        matrix = None
    if not matrix:
        cfg = load_project_config(paths)
        matrix = cross_matrix(paths, cfg, max_tokens=max_tokens, split=split, log=print)
    return matrix, matrix_figure(matrix)


def minimal_pairs(paths: ProjectPaths, pairs_path: Path, limit: int = 2):
    """Run `evaluate --pairs` now on the base and every adapter (`limit` pairs per paradigm)."""
    from lora_project.config import load_project_config
    from lora_project.evaluation.evaluate import evaluate_minimal_pairs

    pairs_path = Path(pairs_path)
    if not pairs_path.exists():
        raise NothingYet(f"no minimal pairs at {pairs_path} (BLiMP lives in ../shared/data/blimp)")
    cfg = load_project_config(paths)
    try:
        names = adapter_names(paths)
    except NothingYet:
        names = []
    evaluate_minimal_pairs(paths, cfg, pairs_path, adapters=[paths.adapters_dir / n for n in names], limit=limit,
                           log=print)
    return pairs_accuracy(paths)


# ------------------------------------------------------------------------------ child-language profile


def latest_profile(paths: ProjectPaths) -> dict:
    """The newest `lora-project profile` result (outputs/metrics/profile_*.json, by modification time)."""
    files = list(paths.metrics_dir.glob("profile_*.json")) if paths.metrics_dir.is_dir() else []
    if not files:
        raise NothingYet("no saved profile; run: lora-project profile --dataset toddler_data "
                         "--adapter adapters/toddler_data_lora --samples 200")
    return json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text())


# mlu_words: words of the text (the corpus-vs-model figure); mlu_words_chat: by CHAT conventions
# (CHAT sources and datasets built from CHAT); mlu_morphemes: from %mor.
_PROFILE_COLUMNS = ("utterances", "mlu_words", "mlu_words_chat", "mlu_morphemes", "mattr", "one_word_share",
                    "two_word_share", "vocabulary")


def profile_table(report: dict):
    """One row for the corpus (with its test-vs-train novelty: the chance baseline), one for the
    within-train baseline, and one per sampled model."""
    import pandas as pd

    def row(name, p, nov, jsd):
        stage = p.get("brown_stage") or {}
        return {"": name, **{k: p.get(k) for k in _PROFILE_COLUMNS}, "jsd_vs_corpus": jsd,
                "verbatim_share": (nov or {}).get("verbatim_share"),
                "ngram4_seen_share": (nov or {}).get("ngram_seen_share"),
                "brown_stage": (stage.get("stage", "") + ("~" if stage.get("approximate") else "")) or None}

    rows = [row(f"corpus {report['label']}", report["corpus"], report.get("baseline"), None)]
    if "baseline_within_train" in report:
        w = report["baseline_within_train"]
        rows.append({"": "train 10% vs 90%", "verbatim_share": w["verbatim_share"],
                     "ngram4_seen_share": w["ngram_seen_share"]})
    rows += [row(name, p, p.get("novelty"), p.get("jsd")) for name, p in report.get("models", {}).items()]
    return pd.DataFrame(rows).set_index("")


def plot_profile(report: dict):
    """Utterance-length distributions of the corpus, the base and each adapter (a figure)."""
    from lora_project.profile.report import plot_lengths

    return plot_lengths(report)


def corpus_profiles(paths: ProjectPaths, split: str = "test"):
    """The profile of every prepared dataset's split, computed now (no model needed)."""
    import pandas as pd

    from lora_project.profile.metrics import profile
    from lora_project.profile.sources import dataset_split

    rows = []
    for name in prepared_datasets(paths):
        corpus = dataset_split(paths, name, split)
        p = profile(corpus.utterances, chat_words=corpus.chat_words)
        rows.append({"dataset": name, **{k: p[k] for k in _PROFILE_COLUMNS},
                     "brown_stage": p["brown_stage"]["stage"] + "~" if p["brown_stage"] else None})
    return pd.DataFrame(rows).set_index("dataset")
