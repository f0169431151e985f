"""The README's Python API example, run as written (paths pointed at the small Cranfield subset)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import read_qrels

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- python-api-example"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, "the README lost its Python API example marker"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    assert match, "no python block after the marker"
    return match.group(1)


def test_example_script_is_the_readme_block():
    assert readme_example() in (ROOT / "examples" / "api_example.py").read_text()


@pytest.mark.slow
def test_readme_python_api_example(small_beir, capsys):
    import datasets

    code = readme_example()
    # The same run on 30 queries instead of 225; the output sits beside the other ecosystem
    # tests' outputs, so it reuses their work dir (`.hardneg-work` beside OUT).
    out = small_beir.parent / "ecosystem" / "api"
    assert code.count('"examples/cranfield"') == 1 and code.count('"out/cranfield-api"') == 1
    code = code.replace('"examples/cranfield"', repr(str(small_beir))).replace('"out/cranfield-api"', repr(str(out)))
    namespace: dict = {}
    exec(compile(code, "README.md#python-api", "exec"), namespace)

    dataset = namespace["dataset"]
    assert isinstance(dataset, datasets.Dataset)
    judged: dict[str, set[str]] = {}
    for q, d, s in read_qrels(small_beir):
        if s > 0:
            judged.setdefault(q, set()).add(d)
    stats = json.loads((out / "stats.json").read_text())
    assert dataset.num_rows == stats["output_pairs"] and dataset.num_rows + sum(stats["rejected_pairs"].values()) == 30
    assert dataset.num_rows >= 20
    assert dataset.column_names[:7] == ["query", "positive"] + [f"negative_{i}" for i in range(1, 6)]
    for row in dataset:
        assert len(set(row["negative_ids"])) == 5
        assert not set(row["negative_ids"]) & judged[row["query_id"]]
        assert row["positive_id"] in judged[row["query_id"]]
    assert namespace["train"].column_names == ["query", "positive"] + [f"negative_{i}" for i in range(1, 6)]
    assert "num_rows" in capsys.readouterr().out  # print(dataset) ran
