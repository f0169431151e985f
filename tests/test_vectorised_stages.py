"""The batch (numpy / Arrow) paths of filter, sample and write give exactly what the row-by-row
paths give, on a real run's candidates (30 Cranfield queries, dense + BM25): every filter type,
every sampling strategy with quotas, relabelling and the consistency check, and the n-tuple and
triplet builders with and without metadata. The row paths (`decide`, `SampleStage.transform_rows`,
`write.rows_format`) are the code the stages ran before they were vectorised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from hardneg import MineConfig, run_mine
from hardneg.stages.filters import LEXICAL_COLUMN, FilterStage, decide, decide_batch, normalize_spec, specs_from_config
from hardneg.stages.io import read_table
from hardneg.stages.lexical import LexicalStage
from hardneg.stages.sample import SampleStage
from hardneg.stages.write import _join_texts, _scores_per_source, rows_format, to_format

BATCH = 7  # several batches, one of them short


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_beir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vectorised")
    config = MineConfig(beir=small_beir, out=root / "out", work_dir=root / "work", num_negatives=4,
                        miners=["dense", "bm25"], runner="local")
    run_mine(config, progress=False)
    work = root / "work"
    one = lambda prefix: next(work.glob(f"{prefix}-*"))  # noqa: E731
    return {"candidates": one("candidates"), "scored": one("lexical"), "bm25": one("bm25_index"), "index": one("index"),
            "corpus": one("ingest") / "corpus", "config": config}


def _batches(table: pa.Table) -> list[pa.Table]:
    return [table.slice(start, BATCH) for start in range(0, table.num_rows, BATCH)]


def _specs(*specs: dict) -> list[dict]:
    taken: set[str] = set()
    return [normalize_spec(spec, "dense", taken) for spec in specs]


SPEC_SETS = {
    "default": None,  # the config's defaults: lexical_duplicate, percentile on bm25
    "rank_and_score": _specs({"type": "range_min", "value": 3}, {"type": "range_max", "value": 40},
                             {"type": "max_score", "value": 0.8}, {"type": "min_score", "value": 0.2},
                             {"type": "absolute_margin", "value": 0.05, "score": "bm25"},
                             {"type": "relative_margin", "value": 0.1}),
    "similarity": _specs({"type": "near_duplicate", "threshold": 0.9}, {"type": "percentile", "value": 50},
                         {"type": "agreement", "top": 20, "margin": 0.02}, {"type": "min_score", "value": 5, "score": "bm25"}),
    "learned": _specs({"type": "pu", "budget": 0.3, "far": 20, "relabel": 0.5}, {"type": "percentile", "value": 70, "score": "bm25"}),
}


def _filter_stage(run, specs, relabel: bool) -> FilterStage:
    specs = specs_from_config(run["config"]) if specs is None else specs
    return FilterStage(specs, seed=12, fit_input=run["scored"], false_negatives="relabel" if relabel else "drop")


def _filtered(run, name: str, relabel: bool = False) -> pa.Table:
    stage = _filter_stage(run, SPEC_SETS[name], relabel)
    return pa.concat_tables(stage(batch) for batch in _batches(read_table(run["scored"])))


@pytest.mark.parametrize("relabel", [False, True])
@pytest.mark.parametrize("name", list(SPEC_SETS))
def test_batch_decisions_equal_row_decisions(run, name, relabel):
    stage = _filter_stage(run, SPEC_SETS[name], relabel)
    lexical = LexicalStage(bm25_dir=run["bm25"], bm25_config=run["config"].bm25, corpus_dir=run["corpus"],
                           rows_dir=run["candidates"])
    decided = 0
    for batch in _batches(read_table(run["candidates"])):
        # The lexical stage's batch scores, read by the filter stage from their column ...
        got = stage(lexical(batch)).column("decisions").to_pylist()
        # ... against the row path with the row reference of the same scores.
        rows = batch.to_pylist()
        for row in rows:
            row[LEXICAL_COLUMN] = lexical._lexicon.scores(row)
        want = [decide(row, stage.specs, models=stage._models, relabel=relabel) for row in rows]
        assert got == want
        decided += sum(d != "kept" for ds in got for d in ds)
    assert decided > 0  # the filters did drop candidates


SAMPLERS = [
    {"strategy": "top"},
    {"strategy": "top", "quotas": {"bm25": 2, "dense": 1}},
    {"strategy": "random", "consistency_top_k": 20},
    {"strategy": "softmax", "temperature": 0.1, "consistency_min_score": 0.5, "score": "bm25"},
    {"strategy": "mmr", "quotas": {"dense": 1}},
]


@pytest.mark.parametrize("relabel", [False, True])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_batch_sampling_equals_row_sampling(run, sampler, relabel):
    filtered = _filtered(run, "learned" if relabel else "similarity", relabel=relabel)
    settings = {"score": "dense", **sampler}
    stage = SampleStage(num_negatives=3, seed=5, index_dir=run["index"], relabel=relabel, **settings)
    for batch in _batches(filtered):
        got, want = stage(batch), stage.transform_rows(batch)
        assert got.schema == want.schema and got.equals(want)
    if relabel:
        assert pc.sum(pc.list_value_length(stage(filtered).column("extra_positive_ids"))).as_py() > 0


def _mined(run, relabel: bool) -> pa.Table:
    filtered = _filtered(run, "learned" if relabel else "default", relabel=relabel)
    stage = SampleStage(num_negatives=4, strategy="top", seed=5, score="dense", relabel=relabel)
    return _join_texts(stage(filtered), run["corpus"])


@pytest.mark.parametrize("relabel", [False, True])
@pytest.mark.parametrize("metadata", [True, False])
@pytest.mark.parametrize("format", ["n-tuple", "triplet"])
def test_columnar_formats_equal_row_formats(run, format, metadata, relabel):
    mined = _mined(run, relabel)
    full = mined.filter(pc.greater_equal(pc.list_value_length(mined.column("negative_ids")), 4))
    got, want = to_format(full, format, 4, metadata, relabel), rows_format(full, format, 4, metadata, relabel)
    assert got.num_rows > 0 and got.schema == want.schema and got.equals(want)


def test_scores_per_source_equals_the_row_loop(run):
    mined = _mined(run, relabel=False)
    want: dict[str, list[float]] = {}
    for scores, sources in zip(mined.column("negative_scores").to_pylist(), mined.column("negative_sources").to_pylist()):
        for score, negative_sources in zip(scores or [], sources or []):
            for source in negative_sources:
                want.setdefault(source, []).append(score)
    got = _scores_per_source(mined)
    from hardneg.stages.write import describe

    assert list(got) == list(want)
    assert got == {source: describe(np.array(values, dtype=np.float64)) for source, values in want.items()}
