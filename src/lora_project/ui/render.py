"""HTML fragments of the board: tables and the side-by-side generations (every value escaped)."""

from __future__ import annotations

from html import escape

from lora_project.ui.state import mlflow_link


def _cell(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return escape(",".join(map(str, value)))
    return escape(str(value))


def table(rows: list[dict], columns: list[tuple[str, str]], *, table_id: str, empty: str,
          uri: str | None = None) -> str:
    """An HTML table of `rows` with (key, heading) columns; a 'mlflow_run_id' column links to the run
    when the tracking URI is an http(s) server."""
    if not rows:
        return f'<p id="{table_id}" class="lp-empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for _, h in columns)
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            if key == "mlflow_run_id" and uri is not None:
                text, href = mlflow_link(uri, r.get(key))
                cells.append(f'<td><a href="{escape(href)}" target="_blank" rel="noopener">{escape(text)}</a></td>'
                             if href else f"<td><code>{escape(text)}</code></td>")
            else:
                cells.append(f"<td>{_cell(r.get(key))}</td>")
        status = escape(str(r.get("status", "")).split(" ")[0].lower())
        body.append(f'<tr class="lp-row lp-{status}" data-name="{escape(str(r.get("name") or r.get("experiment") or ""))}">'
                    + "".join(cells) + "</tr>")
    return (f'<table id="{table_id}" class="lp-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def side_by_side(prompt: str, outputs: dict[str, str | None]) -> str:
    """One column per model: the prompt, then its continuation (or 'generating ...')."""
    cols = []
    for label, text in outputs.items():
        body = escape(text) if text is not None else '<span class="lp-wait">generating ...</span>'
        cols.append(f'<div class="cmp-col" data-model="{escape(label)}"><h4>{escape(label)}</h4>'
                    f'<pre><b>{escape(prompt)}</b>{body}</pre></div>')
    return f'<div class="cmp-grid">{"".join(cols)}</div>'


def matrix_table(matrix: dict) -> str:
    """Perplexity (bits per byte) of each model on each dataset."""
    head = "".join(f"<th>{escape(d)}</th>" for d in matrix["datasets"])
    rows = []
    for m in matrix["models"]:
        cells = "".join(f"<td>{c['perplexity']:.2f} ({c['bits_per_byte']:.3f} b/B)</td>"
                        for c in (matrix["cells"][m][d] for d in matrix["datasets"]))
        rows.append(f'<tr data-name="{escape(m)}"><th>{escape(m)}</th>{cells}</tr>')
    return (f'<table id="matrix-table" class="lp-table"><thead><tr><th>model</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def pairs_table(result: dict) -> str:
    """Minimal-pair accuracy per paradigm and model, macro average last."""
    models = list(result["models"])
    paradigms = sorted({p for m in models for p in result["models"][m].get("paradigms", {})})
    head = "".join(f"<th>{escape(m)}</th>" for m in models)
    rows = [f"<tr><th>{escape(p)}</th>" + "".join(
        f"<td>{_cell(result['models'][m].get('paradigms', {}).get(p, {}).get('accuracy'))}</td>" for m in models)
        + "</tr>" for p in paradigms]
    rows.append("<tr><th>macro average</th>" + "".join(
        f"<td>{_cell(result['models'][m].get('macro_accuracy'))}</td>" for m in models) + "</tr>")
    return (f'<table id="pairs-table" class="lp-table"><thead><tr><th>paradigm</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


CSS = """
.lp-table { border-collapse: collapse; font-size: 0.9em; }
.lp-table th, .lp-table td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
.lp-broken td, .lp-failed td, .lp-killed td { color: #a33; }
.cmp-grid { display: flex; gap: 12px; flex-wrap: wrap; }
.cmp-col { flex: 1 1 240px; border: 1px solid #ccc; border-radius: 6px; padding: 6px 10px; }
.cmp-col pre { white-space: pre-wrap; font-family: ui-monospace, monospace; }
.lp-err { color: #b00; font-size: 0.85em; min-height: 1em; }
.lp-err p { margin: 0; }
"""
