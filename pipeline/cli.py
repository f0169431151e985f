"""The `hardneg` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.config import ConfigError, build_config, describe_keys

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Mine hard negatives for embedding and reranker training.")
log = logging.getLogger("hardneg")


@app.callback()
def _root() -> None:
    """Mine hard negatives for embedding and reranker training."""


def _setup_logging(level: str, quiet: bool) -> None:
    if quiet:
        # Before transformers/datasets are imported (here and in Ray workers, which inherit HF_*).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING if quiet else getattr(logging, level.upper(), logging.INFO),
                        format="%(message)s", stream=sys.stderr)
    for noisy in ("sentence_transformers", "transformers", "datasets", "ray", "faiss", "bm25s", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


MINE_HELP = "Mine hard negatives into a Hugging Face dataset.\n\nEvery config key (YAML or --set key=value):\n\n" + "\n\n".join(
    describe_keys().splitlines()
)


@app.command("mine", help=MINE_HELP)
def mine(
    beir: Optional[Path] = typer.Option(None, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)"),
    pairs: Optional[Path] = typer.Option(None, help="pair file: JSONL, Parquet or datasets folder"),
    corpus: Optional[Path] = typer.Option(None, help="corpus file for --pairs"),
    out: Optional[Path] = typer.Option(None, help="output folder"),
    config: Optional[Path] = typer.Option(None, help="YAML config file"),
    num_negatives: Optional[int] = typer.Option(None, help="negatives per pair"),
    format: Optional[str] = typer.Option(None, help="triplet | n-tuple | labeled-pair | labeled-list"),
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or logs"),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
) -> None:
    _setup_logging(log_level, quiet)
    from pipeline.api import run_mine
    from pipeline.summary import print_summary

    overrides = dict(beir=beir, pairs=pairs, corpus=corpus, out=out, num_negatives=num_negatives, format=format,
                     positives=positives, hide_extra_positives=hide_extra_positives, split=split, miners=miners,
                     cross_encoder=cross_encoder, corpus_embeddings=corpus_embeddings, model=model, layout=layout,
                     work_dir=work_dir, ray_address=ray_address, runner=runner, seed=seed)
    cfg = build_config(config, overrides, set_)
    result = run_mine(cfg, progress=not quiet)
    reused = ", ".join(result.reused) or "none"
    log.info("reused stages: %s", reused)
    log.info("computed stages: %s", ", ".join(result.computed) or "none")
    if not quiet:
        print_summary(result)


def main() -> None:
    """Entry point: every user error is one line on stderr and exit code 2, never a traceback."""
    from pipeline.errors import user_error_message

    try:
        app(standalone_mode=False)
    except SystemExit as exit_:
        raise
    except BaseException as err:  # noqa: BLE001 - classified below
        message = user_error_message(err)
        if message is None:
            raise
        print(f"hardneg: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
