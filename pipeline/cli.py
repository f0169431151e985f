"""The `hardneg` command line."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import typer

from hardneg.pipeline.config import build_config, describe_keys
from hardneg.pipeline.errors import ConfigError, Interrupted, interrupted_message, user_error_message

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mine hard negatives for embedding and reranker training.")
log = logging.getLogger("hardneg")


@app.callback()
def _root() -> None:
    """Mine hard negatives for embedding and reranker training."""


def _setup_logging(level: str, quiet: bool) -> None:
    """The terminal shows hardneg's stage lines, its progress bars and the summary; libraries'
    own bars and notices (weights loading, dataset saving, Ray's reports) only with
    `--log-level debug`. Ray's log lines go to a file in the work dir (pipeline/executors/ray.py)."""
    debug = level.lower() == "debug"
    if not debug:
        # Before transformers/datasets are imported (here and in Ray workers, which inherit HF_*).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from hardneg.pipeline.progress import BarSafeHandler

    handler = BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING if quiet else getattr(logging, level.upper(), logging.INFO),
                        handlers=[handler])
    if not debug:
        for noisy in ("sentence_transformers", "transformers", "datasets", "ray", "faiss", "bm25s", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # The index builder's per-shard timings: detail for debugging, not a stage line.
        logging.getLogger("hardneg.stages.engines.faiss_index").setLevel(logging.WARNING)


MINE_HELP = "Mine hard negatives into a Hugging Face dataset.\n\nEvery config key (YAML or --set key=value):\n\n" + "\n\n".join(
    describe_keys().splitlines()
)


@app.command("mine", help=MINE_HELP)
def mine(
    beir: Optional[Path] = typer.Option(None, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)"),
    pairs: Optional[Path] = typer.Option(None, help="pair file: JSONL, CSV, TSV (maybe .gz), Parquet or datasets folder"),
    corpus: Optional[Path] = typer.Option(None, help="corpus file for --pairs"),
    out: Optional[Path] = typer.Option(None, help="output folder"),
    config: Optional[Path] = typer.Option(None, help="YAML config file"),
    num_negatives: Optional[int] = typer.Option(None, help="negatives per pair"),
    format: Optional[str] = typer.Option(None, "--format", "--output-format", help="triplet | n-tuple | labeled-pair | labeled-list"),
    positives: Optional[str] = typer.Option(None, help="all | best"),
    hide_extra_positives: Optional[bool] = typer.Option(None, "--hide-extra-positives", help="with --positives best: keep other judged positives in the pool"),
    split: Optional[str] = typer.Option(None, help="qrels split"),
    miners: Optional[str] = typer.Option(None, help="dense,bm25"),
    cross_encoder: Optional[str] = typer.Option(None, help="cross-encoder path or hub id"),
    corpus_embeddings: Optional[Path] = typer.Option(None, help="precomputed corpus vectors"),
    model: Optional[str] = typer.Option(None, help="bi-encoder path or hub id"),
    layout: Optional[str] = typer.Option(None, help="disk | hub"),
    work_dir: Optional[Path] = typer.Option(None, help="cache of stage outputs"),
    ray_address: Optional[str] = typer.Option(None, help="join a Ray cluster"),
    runner: Optional[str] = typer.Option(None, help="ray | local"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    set_: list[str] = typer.Option([], "--set", help="key=value (any config key, dotted for sections)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="only the final summary: no stage lines or progress bars"),
    log_level: str = typer.Option("info", help="debug (everything, Ray's reports too) | info | warning | error"),
    push_to_hub: Optional[str] = typer.Option(None, help="after writing, upload OUT to this Hub dataset repo (user/name; implies --layout hub)"),
) -> None:
    _setup_logging(log_level, quiet)
    from hardneg.pipeline.api import run_mine
    from hardneg.pipeline.outputs.summary import print_summary

    overrides = dict(beir=beir, pairs=pairs, corpus=corpus, out=out, num_negatives=num_negatives, format=format,
                     positives=positives, hide_extra_positives=hide_extra_positives, split=split, miners=miners,
                     cross_encoder=cross_encoder, corpus_embeddings=corpus_embeddings, model=model, layout=layout,
                     work_dir=work_dir, ray_address=ray_address, runner=runner, seed=seed)
    if push_to_hub and layout is None:
        overrides["layout"] = "hub"
    cfg = build_config(config, overrides, set_)
    if push_to_hub:
        from hardneg.pipeline.outputs.card import check_push

        if cfg.layout != "hub":
            raise ConfigError("--push-to-hub uploads the hub layout: drop --layout disk")
        check_push(push_to_hub)
    result = run_mine(cfg, progress=not quiet)
    log.debug("reused stages: %s", ", ".join(result.reused) or "none")
    log.debug("computed stages: %s", ", ".join(result.computed) or "none")
    print_summary(result)
    if push_to_hub:
        from hardneg.pipeline.outputs.card import PushError, push_to_hub as push

        try:
            log.info("pushed %s to %s", result.out, push(result.out, push_to_hub))
        except PushError as err:  # the output is complete: say so in one line, no traceback
            print(f"hardneg: error: {err}", file=sys.stderr)
            sys.exit(2)


@app.command("eval")
def eval_(
    beir: Path = typer.Option(..., help="BEIR folder whose qrels judge the negatives"),
    dataset: Path = typer.Option(..., help="a folder `hardneg mine` wrote"),
    split: Optional[str] = typer.Option(None, help="qrels split (default: the one mined)"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="also write the figures to this JSON file"),
    model: Optional[str] = typer.Option(None, help="reference bi-encoder for hardness ranks (default all-MiniLM-L6-v2)"),
    work_dir: Optional[Path] = typer.Option(None, help="cache of embeddings (default: the mining run's)"),
    queries: Optional[Path] = typer.Option(None, help="evaluate only the query ids listed in this file (one a line)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no table, only --json"),
    log_level: str = typer.Option("warning", help="debug | info | warning | error"),
) -> None:
    """False-negative rate, hardness and coverage of a mined dataset against BEIR judgements."""
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)  # eval shows no progress bars: only its tables
    _setup_logging(log_level, quiet)
    from hardneg.pipeline.outputs.evaluate import EvalError, evaluate, print_report
    from hardneg.pipeline.store import write_json_atomic

    query_ids = None
    if queries is not None:
        if not queries.is_file():
            raise EvalError(f"query id file not found: {queries}")
        query_ids = [line.strip() for line in queries.read_text().splitlines() if line.strip()]
    result = evaluate(beir, dataset, split=split, model=model, work_dir=work_dir, query_ids=query_ids)
    if json_file is not None:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_file, result)
    if not quiet:
        print_report(result)


@app.command("export")
def export_(
    out: Path = typer.Argument(..., help="a folder `hardneg mine` wrote (either --layout)"),
    to: str = typer.Option(..., "--to", help="flagembedding | tevatron"),
    out_file: Path = typer.Option(..., "--out", help="JSONL file to write (replaced atomically)"),
    log_level: str = typer.Option("warning", help="debug | info | warning | error"),
) -> None:
    """Write a mined dataset as another trainer's training data (JSON lines)."""
    _setup_logging(log_level, False)
    from hardneg.pipeline.outputs.export import export

    rows = export(out, to, out_file)
    print(f"wrote {rows} rows to {out_file}")


def _raise_on_sigterm(signum, frame) -> None:
    # One shot: a second SIGTERM during the cleanup kills at once (the default action).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Interrupted(signum)


def _interrupted(signum: int) -> None:
    print(f"hardneg: {interrupted_message(signum)}", file=sys.stderr)
    if "ray" in sys.modules:
        # The run's cleanup (temp folders, locks, ray.shutdown) has run in its finally blocks.
        # After a SIGTERM, Ray's own signal handler leaves its core worker in a state that
        # aborts (SIGABRT) while the interpreter finalises: exit here, with the code we mean.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)
    sys.exit(128 + signum)


def _run_app(previous_sigterm) -> int | None:
    try:
        return app(standalone_mode=False)
    finally:
        # main() may run inside another program (the tests call it in-process): give SIGTERM back.
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def main() -> None:
    """Entry point: every user error is one line on stderr and exit code 2, never a traceback;
    an interrupted run (SIGINT, SIGTERM) is one line and exit code 130 / 143."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        code = _run_app(previous)
    except SystemExit as exit_:
        # ray.init() replaces the SIGTERM handler with one that calls sys.exit(SIGTERM): nothing
        # else in hardneg exits with 15, so that exit is a SIGTERM too.
        if exit_.code == signal.SIGTERM:
            _interrupted(signal.SIGTERM)
        raise
    except KeyboardInterrupt:  # raised outside the command (typer catches it inside)
        _interrupted(signal.SIGINT)
    except Interrupted as interrupted:
        _interrupted(interrupted.signum)
    except BaseException as err:  # noqa: BLE001 - classified below
        message = user_error_message(err)
        if message is None:
            raise
        print(f"hardneg: error: {message}", file=sys.stderr)
        sys.exit(2)
    # typer turns a KeyboardInterrupt inside the command into the return value 130.
    if code == 128 + signal.SIGINT:
        _interrupted(signal.SIGINT)
    if isinstance(code, int) and code:
        sys.exit(code)


@app.command("report")
def report(
    out: Path = typer.Argument(..., help="a folder `hardneg mine` wrote"),
    html: Path = typer.Option(..., help="write the self-contained HTML page here"),
    beir: Optional[Path] = typer.Option(None, help="BEIR folder: add the evaluation against its qrels"),
    log_level: str = typer.Option("warning", help="debug | info | warning | error"),
) -> None:
    """An HTML page (plots inline) of a mined output: scores, filter decisions, negatives per
    query, rejects and, with --beir, the evaluation."""
    _setup_logging(log_level, False)
    from hardneg.pipeline.outputs.report import write_report

    print(f"wrote {write_report(out, html, beir=beir)}")


if __name__ == "__main__":
    main()
