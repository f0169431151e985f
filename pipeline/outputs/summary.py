"""The summary printed at the end of a run: fits a terminal 100 columns wide."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _table(title: str) -> Table:
    """A table whose left-justified title never wraps: at least as wide as its title."""
    return Table(title=title, title_justify="left", min_width=len(title) + 2)


def _score_table(title: str, rows: dict[str, dict]) -> Table:
    table = _table(title)
    columns = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    table.add_column("")
    for column in columns:
        table.add_column(column, justify="right")
    for name, stats in rows.items():
        table.add_row(name, *[_fmt(stats.get(c)) for c in columns])
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def print_summary(result, console: Console | None = None) -> None:
    console = console or Console(width=100, stderr=False)
    stats = result.stats
    console.print(f"[bold]hardneg[/bold] wrote {stats.get('output_rows', 0)} rows to {result.out}")
    console.print(
        f"pairs: {stats.get('input_pairs')} in = {stats.get('output_pairs')} written + "
        f"{sum(stats.get('rejected_pairs', {}).values())} rejected"
    )
    scores = {"positive": stats["scores"]["positive"], "negative": stats["scores"]["negative"]}
    per_source = stats.get("scores_per_source", {})
    if len(per_source) > 1:  # one source: its row would repeat the negative row
        for source, values in per_source.items():
            scores[f"negative ({source})"] = values
    console.print(_score_table("Scores", scores))
    decisions = _table("Candidates by decision")
    decisions.add_column("decision")
    decisions.add_column("count", justify="right")
    for decision, count in stats.get("decisions", {}).items():
        decisions.add_row(decision, str(count))
    console.print(decisions)
    console.print(f"pairs short of negatives: {stats.get('pairs_short_of_negatives', 0)}")
    rejects = stats.get("rejects", {})
    if rejects:
        table = _table("Rejects by reason")
        table.add_column("reason")
        table.add_column("count", justify="right")
        for reason, count in sorted(rejects.items()):
            table.add_row(reason, str(count))
        console.print(table)
    stages = ", ".join(f"{r.name}{' (reused)' if r.reused else ''}" for r in result.stages)
    console.print(f"stages: {stages}", soft_wrap=False)
