"""The one reader of finished output folders, whichever layout wrote them: `disk` (a
`datasets.save_to_disk` folder, possibly with no rows, which `load_from_disk` cannot open) or
`hub` (`data/*.parquet`). Evaluation, the report, export and the Python API read through it,
so a folder that is not a hardneg output is refused the same way everywhere: one line, in the
caller's error type."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from hardneg.pipeline.errors import ConfigError, UserError


def read_stats(folder: Path) -> dict[str, Any]:
    """`stats.json` of an output ({} where there is none)."""
    path = Path(folder) / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class OutputFolder:
    def __init__(self, folder: Path, error: type[UserError] = ConfigError) -> None:
        self.folder = Path(folder)
        self.error = error
        if not self.folder.is_dir():
            raise error(f"not a hardneg output: {self.folder} is not a folder")
        self.shards = sorted((self.folder / "data").glob("*.parquet")) if (self.folder / "data").is_dir() else []
        disk = ((self.folder / "state.json").is_file() and (self.folder / "dataset_info.json").is_file()) or (
            self.folder / "dataset_dict.json").is_file()
        if not disk and not self.shards:
            raise error(f"not a hardneg output: {self.folder} has neither a datasets save_to_disk dataset nor data/*.parquet")
        self.layout = "disk" if disk else "hub"
        self._empty_schema = self._empty_disk_schema() if disk else None

    def _fail(self, err: Exception, where: Path | None = None) -> UserError:
        first = (str(err).splitlines() or [""])[0]
        return self.error(f"not a hardneg output: {where or self.folder}: {err.__class__.__name__}: {first}".rstrip(": "))

    def _empty_disk_schema(self) -> pa.Schema | None:
        """The schema of a save_to_disk dataset with no rows (datasets writes zero shards for it);
        None for any other folder."""
        try:
            state = json.loads((self.folder / "state.json").read_text(encoding="utf-8"))
            info = json.loads((self.folder / "dataset_info.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("_data_files") != []:
            return None
        features = info.get("features") if isinstance(info, dict) else None
        if not isinstance(features, dict):
            return None
        import datasets

        return datasets.Features.from_dict(features).arrow_schema

    def dataset(self):
        """The output as a `datasets.Dataset` (its `train` split)."""
        import datasets

        if self.layout == "hub":
            return datasets.load_dataset(str(self.folder), split="train")
        if self._empty_schema is not None:
            return datasets.Dataset(self._empty_schema.empty_table())
        try:
            loaded = datasets.load_from_disk(str(self.folder))
        except Exception as err:  # noqa: BLE001 - a corrupt or foreign folder: one line
            raise self._fail(err) from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise self.error(f"not a hardneg output: {self.folder} is a DatasetDict without a 'train' split")
            loaded = loaded["train"]
        return loaded

    def _parquet(self):
        import pyarrow.dataset as pads

        try:
            return pads.dataset([str(s) for s in self.shards], format="parquet")
        except Exception as err:  # noqa: BLE001
            raise self._fail(err, self.folder / "data") from None

    def table(self) -> pa.Table:
        """The whole output as one Arrow table."""
        if self.layout == "hub":
            try:
                return self._parquet().to_table()
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001
                raise self._fail(err, self.folder / "data") from None
        if self._empty_schema is not None:
            return self._empty_schema.empty_table()
        return self.dataset().data.table

    def columns(self) -> list[str]:
        if self.layout == "hub":
            return list(self._parquet().schema.names)
        if self._empty_schema is not None:
            return list(self._empty_schema.names)
        return list(self.dataset().column_names)

    def row_batches(self, batch_size: int = 1024) -> Iterator[list[dict[str, Any]]]:
        """The rows as dicts, a batch at a time (memory stays flat on a large output)."""
        if self.layout == "hub":
            for batch in self._parquet().to_batches(batch_size=batch_size):
                yield batch.to_pylist()
        elif self._empty_schema is None:
            for batch in self.dataset().iter(batch_size=batch_size):
                names = list(batch)
                yield [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]
