"""The Python API: the same config keys as the CLI, for notebooks and scripts.

    from hardneg import mine
    dataset = mine(beir="examples/cranfield", out="out/cranfield", positives="best", num_negatives=5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hardneg.pipeline.config import MineConfig, build_config, canonical_keys
from hardneg.pipeline.runner import Pipeline, RunResult


def run_mine(config: MineConfig, *, progress: bool = True) -> RunResult:
    from hardneg.pipeline.outputs.card import write_card

    return Pipeline(config, progress=progress, write_card=write_card).run()


def mine(config: MineConfig | str | Path | None = None, *, progress: bool = False, **keys: Any):
    """Mine hard negatives and return the output as a `datasets.Dataset`.

    `config` may be a MineConfig or a YAML file; keyword arguments are config keys and win."""
    keys = canonical_keys(keys)  # sentence-transformers' names (output_format, batch_size, ...) too
    if isinstance(config, MineConfig):
        cfg = config.model_copy(update=keys)
        cfg = MineConfig(**cfg.model_dump())
    else:
        cfg = build_config(Path(config) if config is not None else None, keys)
    from hardneg.pipeline.outputs.reader import OutputFolder

    return OutputFolder(run_mine(cfg, progress=progress).out).dataset()
