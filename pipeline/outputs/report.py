"""`hardneg report OUT --html FILE`: one self-contained HTML page about a mined output.

Everything is inline (plots are base64 PNGs drawn with matplotlib's Agg backend, no scripts, no
external CSS), so the page can be mailed, attached to a CI run or opened offline. It shows the
score distributions of positives and negatives per source, what each filter dropped, the
negatives per pair, the rejects by reason and, with `--beir`, the evaluation against the qrels.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hardneg.pipeline.outputs.card import format_value  # one number format for the card and the report
from hardneg.pipeline.errors import ReportError, UserError
from hardneg.pipeline.outputs.reader import OutputFolder

log = logging.getLogger("hardneg")

_SHORT_DETAIL = re.compile(r"^(\d+) of (\d+) negatives")
_COLORS = {"positive": "#2b8a3e", "negative": "#c92a2a", "dense": "#1c7ed6", "bm25": "#e8590c", "kept": "#2b8a3e",
           "cross_encoder": "#7048e8"}
_PALETTE = ["#1c7ed6", "#e8590c", "#7048e8", "#0c8599", "#e64980", "#5c940d", "#862e9c", "#a61e4d"]


# ---------------------------------------------------------------------- reading an output
def load_stats(out: Path) -> dict[str, Any]:
    path = Path(out) / "stats.json"
    if not path.is_file():
        raise ReportError(f"{out} is not a hardneg output: no stats.json")
    return json.loads(path.read_text())


def load_table(out: Path) -> pa.Table:
    """The written dataset as one Arrow table, whichever layout wrote it."""
    return OutputFolder(out, ReportError).table()


def load_rejects(out: Path) -> pa.Table | None:
    files = sorted((Path(out) / "rejects").glob("*.parquet"))
    if not files:
        return None
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def _col(table: pa.Table, name: str) -> list | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def score_samples(table: pa.Table) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """(positive scores, negative scores per source, all negative scores) in any output format;
    empty without metadata columns. Scores are the filter score (`score` key)."""
    positives: list[float] = []
    per_source: dict[str, list[float]] = {}
    negatives: list[float] = []

    def add_negative(score, sources):
        if score is None:
            return
        negatives.append(score)
        for source in sources or ["unknown"]:
            per_source.setdefault(source, []).append(score)

    if "negative_scores" in table.column_names:  # n-tuple, labeled-list
        for pos, scores, sources in zip(_col(table, "positive_score") or [], _col(table, "negative_scores"),
                                        _col(table, "negative_sources") or []):
            if pos is not None:
                positives.append(pos)
            for i, score in enumerate(scores or []):
                add_negative(score, sources[i] if sources and i < len(sources) else None)
    elif "negative_score" in table.column_names:  # triplet: K rows per pair
        seen = set()
        for pair, pos, score, sources in zip(_col(table, "pair_id"), _col(table, "positive_score"),
                                             _col(table, "negative_score"), _col(table, "negative_source")):
            if pair not in seen and pos is not None:
                seen.add(pair)
                positives.append(pos)
            add_negative(score, sources)
    elif "label" in table.column_names and "score" in table.column_names:  # labeled-pair
        for label, score, sources in zip(_col(table, "label"), _col(table, "score"), _col(table, "sources") or []):
            if label == 1:
                if score is not None:
                    positives.append(score)
            else:
                add_negative(score, sources)
    return positives, per_source, negatives


def negatives_per_pair(table: pa.Table) -> list[int]:
    """How many negatives each written pair carries."""
    names = table.column_names
    if "negative_ids" in names:
        return [len(ids or []) for ids in _col(table, "negative_ids")]
    if "labels" in names:
        return [sum(1 for label in labels if label == 0) for labels in _col(table, "labels")]
    if "label" in names and "pair_id" in names:
        counts: dict[str, int] = {}
        for pair, label in zip(_col(table, "pair_id"), _col(table, "label")):
            counts[pair] = counts.get(pair, 0) + (label == 0)
        return list(counts.values())
    if "negative" in names and "pair_id" in names:
        counts = {}
        for pair in _col(table, "pair_id"):
            counts[pair] = counts.get(pair, 0) + 1
        return list(counts.values())
    negative_columns = [n for n in names if re.fullmatch(r"negative_\d+", n)]
    return [len(negative_columns)] * table.num_rows


def short_pairs(rejects: pa.Table | None) -> list[int]:
    """Negatives that survived for each pair rejected as short_of_negatives."""
    if rejects is None or "reason" not in rejects.column_names:
        return []
    out = []
    for reason, detail in zip(_col(rejects, "reason"), _col(rejects, "detail") or []):
        if reason == "short_of_negatives" and detail:
            match = _SHORT_DETAIL.match(detail)
            if match:
                out.append(int(match.group(1)))
    return out


# ---------------------------------------------------------------------- plots
def _figure(width: float = 9.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(width, height), dpi=100)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _img(data: str, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def plot_scores(positives: list[float], per_source: dict[str, list[float]], score_name: str) -> str | None:
    if not positives and not per_source:
        return None
    sources = sorted(per_source)
    panels = max(1, len(sources))
    fig = _figure(min(4.2 * panels, 13.0), 3.2)
    values = [v for v in positives] + [v for s in sources for v in per_source[s]]
    bins = np.linspace(min(values), max(values), 31) if values and min(values) < max(values) else 30
    for i, source in enumerate(sources or ["(none)"]):
        ax = fig.add_subplot(1, panels, i + 1)
        if positives:
            ax.hist(positives, bins=bins, alpha=0.55, color=_COLORS["positive"], label=f"positives ({len(positives)})")
        if source in per_source:
            ax.hist(per_source[source], bins=bins, alpha=0.55, color=_COLORS.get(source, _PALETTE[i % len(_PALETTE)]),
                    label=f"negatives from {source} ({len(per_source[source])})")
        ax.set_title(f"negatives found by {source} ({score_name} score)", fontsize=10)
        ax.set_xlabel(f"{score_name} score")
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
    return _png(fig)


def plot_decisions(decisions: dict[str, int], per_source: dict[str, dict[str, int]]) -> str | None:
    if not decisions:
        return None
    names = sorted(decisions, key=lambda d: (d == "kept", -decisions[d]))
    sources = sorted(per_source)
    fig = _figure(9.0, 0.9 + 0.45 * len(names) * max(1, len(sources)) ** 0.5)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    if sources:
        height = 0.8 / len(sources)
        for i, source in enumerate(sources):
            counts = [per_source[source].get(n, 0) for n in names]
            bars = ax.barh(y + (i - (len(sources) - 1) / 2) * height, counts, height=height,
                           color=_COLORS.get(source, _PALETTE[i % len(_PALETTE)]), label=f"found by {source}")
            ax.bar_label(bars, fontsize=7, padding=2)
        ax.legend(fontsize=8, loc="best")
    else:
        bars = ax.barh(y, [decisions[n] for n in names], color=[_COLORS["kept"] if n == "kept" else "#868e96" for n in names])
        ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.margins(x=0.1)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("candidates")
    ax.set_title("Candidates by filter decision (a candidate found by several sources counts once per source)", fontsize=10)
    return _png(fig)


def plot_negatives_per_pair(counts: list[int], short: list[int], k: int | None) -> str | None:
    if not counts and not short:
        return None
    top = max(counts + short + [k or 0])
    edges = np.arange(-0.5, top + 1.5, 1.0)
    fig = _figure(9.0, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist([counts, short], bins=edges, stacked=True, color=["#1c7ed6", "#adb5bd"],
            label=[f"written pairs ({len(counts)})", f"rejected as short_of_negatives ({len(short)})"])
    if k:
        ax.axvline(k, color="#c92a2a", linestyle="--", linewidth=1, label=f"num_negatives = {k}")
    ax.set_xlabel("negatives per pair")
    ax.set_ylabel("pairs")
    ax.set_xlim(-0.5, top + 0.5)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Negatives per query (one pair = a query and one positive)", fontsize=10)
    return _png(fig)


def plot_rejects(rejects: dict[str, int]) -> str | None:
    if not rejects:
        return None
    names = sorted(rejects, key=lambda r: -rejects[r])
    fig = _figure(9.0, 0.9 + 0.4 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.barh(np.arange(len(names)), [rejects[n] for n in names], color="#868e96")
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    ax.margins(x=0.1)
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("rejects")
    ax.set_title("Rejects by reason", fontsize=10)
    return _png(fig)


# ---------------------------------------------------------------------- html pieces
def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"{'num' if isinstance(v, (int, float)) and not isinstance(v, bool) else ''}\">"
                         f"{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def eval_section(out: Path, beir: Path | None) -> str:
    if beir is None:
        return "<p class=\"muted\">No evaluation: give <code>--beir DIR</code> to evaluate against its qrels.</p>"
    try:
        from hardneg.pipeline.outputs.evaluate import evaluate
    except ImportError:
        return "<p class=\"muted\" id=\"eval-unavailable\">eval unavailable (this hardneg has no pipeline.evaluate)</p>"
    try:
        result = evaluate(Path(beir), Path(out))
    except UserError:  # a wrong --beir is the user's to fix, as in `hardneg eval`: one line, exit 2
        raise
    except Exception as err:  # noqa: BLE001 - the rest of the report is still worth having
        log.warning("evaluation failed: %s", err)
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return f"<p class=\"muted\" id=\"eval-unavailable\">eval unavailable: {html.escape(first)}</p>"
    from hardneg.pipeline.outputs.card import eval_tables

    parts = [f"<p class=\"muted\">Against {html.escape(str(beir))} ({html.escape(str(result.get('split', '')))}), "
             f"hardness ranks under {html.escape(str(result.get('model') or '-'))}: <code>fn_rate</code> is the share of "
             "negatives judged relevant, <code>coverage</code> the share of judged queries with a full set of negatives.</p>"]
    for title, header, rows in eval_tables(result):
        parts.append(f"<h3>{html.escape(title)}</h3>" + _table(header, rows))
    return "\n".join(parts)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 24px auto; max-width: 1100px;
       color: #212529; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #dee2e6; }
.muted { color: #6c757d; } code { background: #f1f3f5; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #dee2e6; padding: 3px 8px; text-align: left; } td.num { text-align: right; }
th { background: #f8f9fa; } img.plot { max-width: 100%; display: block; margin: 8px 0; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; } .card { border: 1px solid #dee2e6; border-radius: 6px; padding: 8px 14px; }
.card b { display: block; font-size: 20px; }
"""


def render_report(out: Path, beir: Path | None = None) -> str:  # long: one HTML page, its sections in reading order
    out = Path(out)
    stats = load_stats(out)
    table = load_table(out)
    rejects_table = load_rejects(out)
    config = stats.get("config") or {}
    score_name = config.get("score", "dense")
    k = config.get("num_negatives")
    positives, per_source, negatives = score_samples(table)
    rejected = sum((stats.get("rejected_pairs") or {}).values())

    parts = [f"<h1>hardneg report: {html.escape(out.name)}</h1>",
             f"<p class=\"muted\">{html.escape(str(out.resolve()))} · format <code>{html.escape(str(config.get('format')))}</code>"
             f" · model <code>{html.escape(str(config.get('model')))}</code> · miners "
             f"<code>{html.escape(','.join(config.get('miners') or []))}</code> · generated "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
             "<div class=\"cards\">" + "".join(
                 f"<div class=\"card\"><b>{format_value(v)}</b>{html.escape(label)}</div>" for label, v in (
                     ("input pairs", stats.get("input_pairs")), ("written pairs", stats.get("output_pairs")),
                     ("rejected pairs", rejected), ("output rows", stats.get("output_rows", table.num_rows)),
                     ("candidates", stats.get("candidates")))) + "</div>"]

    parts.append("<h2 id=\"scores\">Score distributions</h2>")
    png = plot_scores(positives, per_source, score_name)
    if png:
        parts.append(_img(png, "score distributions of positives and negatives per source"))
    else:
        parts.append("<p class=\"muted\">No scores in this output (written with metadata_columns: false).</p>")
    columns = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    score_rows = [[name, *[(stats.get("scores") or {}).get(name, {}).get(c) for c in columns]] for name in ("positive", "negative")]
    score_rows += [[f"negative ({s})", *[v.get(c) for c in columns]] for s, v in (stats.get("scores_per_source") or {}).items()]
    parts.append(_table(["", *columns], score_rows))

    parts.append("<h2 id=\"filters\">What the filters dropped</h2>")
    decisions = stats.get("decisions") or {}
    png = plot_decisions(decisions, stats.get("decisions_per_source") or {})
    if png:
        parts.append(_img(png, "candidates by filter decision"))
    dropped = {d: n for d, n in decisions.items() if d != "kept"}
    if decisions and not dropped:
        parts.append("<p class=\"muted\">No filter dropped a candidate.</p>")
    per_source_decisions = stats.get("decisions_per_source") or {}
    sources = sorted(per_source_decisions)
    parts.append(_table(["decision", "candidates", *[f"found by {s}" for s in sources]],
                        [[d, n, *[per_source_decisions[s].get(d, 0) for s in sources]] for d, n in decisions.items()]))

    parts.append("<h2 id=\"negatives\">Negatives per query</h2>")
    png = plot_negatives_per_pair(negatives_per_pair(table), short_pairs(rejects_table), k)
    if png:
        parts.append(_img(png, "negatives per query"))
    parts.append(f"<p class=\"muted\">{stats.get('pairs_short_of_negatives', 0)} pairs had fewer than {k} surviving negatives.</p>")

    parts.append("<h2 id=\"rejects\">Rejects by reason</h2>")
    rejects = stats.get("rejects") or {}
    png = plot_rejects(rejects)
    if png:
        parts.append(_img(png, "rejects by reason"))
        parts.append(_table(["reason", "count"], [[r, n] for r, n in sorted(rejects.items(), key=lambda x: -x[1])]))
        if rejects_table is not None and rejects_table.num_rows:
            examples = []
            for reason in sorted(rejects):
                rows = rejects_table.filter(pc.equal(rejects_table.column("reason"), reason)).slice(0, 3).to_pylist()
                examples += [[r.get("reason"), r.get("stage"), r.get("source"), r.get("line"), r.get("id"), r.get("detail")] for r in rows]
            parts.append("<p class=\"muted\">Examples (up to 3 per reason; all in <code>rejects/</code>):</p>")
            parts.append(_table(["reason", "stage", "source", "line", "id", "detail"], examples))
    else:
        parts.append("<p class=\"muted\">No rejects.</p>")

    parts.append("<h2 id=\"eval\">Evaluation</h2>")
    parts.append(eval_section(out, beir))

    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>hardneg report: {html.escape(out.name)}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def write_report(out: Path, html_file: Path, beir: Path | None = None) -> Path:
    out = Path(out)
    if not out.is_dir():
        raise ReportError(f"output folder not found: {out}")
    if beir is not None and not Path(beir).is_dir():
        raise ReportError(f"BEIR folder not found: {beir}")
    if beir is not None:
        split = (load_stats(out).get("config") or {}).get("split") or "test"
        from hardneg.stages.ingest import beir_file

        if beir_file(Path(beir), f"qrels/{split}.tsv") is None:
            raise ReportError(f"BEIR folder {beir}: missing qrels/{split}.tsv (the split {out} was mined from)")
    text = render_report(out, beir)
    html_file = Path(html_file)
    html_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = html_file.with_name(f".{html_file.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(html_file)
    return html_file
