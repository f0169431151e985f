"""The vectorised candidates stage writes exactly what the per-query implementation it replaced
wrote. That implementation is kept below, verbatim, as a private reference (`_PerQuery`): each
test mines the Cranfield subset, then runs both on the same queries with the same index files and
compares the candidate tables (and a whole run's output) value for value."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest

from hardneg import MineConfig, run_mine, schemas
from hardneg.stages.candidates import CandidatesStage
from hardneg.stages.io import VectorFile, read_table

pytestmark = pytest.mark.slow

SCAN_CHUNK = 16_384


class _OldBatchVectors:
    def __init__(self, source: VectorFile, rows: np.ndarray) -> None:
        self._rows = np.unique(rows)
        self._matrix = source.take(self._rows)

    def _get(self, rows: np.ndarray) -> np.ndarray:
        return self._matrix[np.searchsorted(self._rows, rows)].astype(np.float64)

    def exact(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0, dtype=np.float32)
        return (self._get(rows) @ query.astype(np.float64)).astype(np.float32)

    def cosines(self, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
        if len(rows) == 0 or len(others) == 0:
            return np.zeros((len(rows), len(others)), dtype=np.float64)
        return self._get(rows) @ self._get(others).T


class _PerQuery(CandidatesStage):
    """The candidates stage as it was before vectorisation (per-query Python fusion, BM25 scored
    query by query through `BM25Index.search` / `score`)."""

    def setup(self) -> None:
        from hardneg.stages.engines.faiss_index import AnnIndex
        from hardneg.stages.engines.bm25 import BM25Index

        index_dir = Path(self.index_dir)
        self._vectors = VectorFile(index_dir / "vectors.npy")
        self._doc_ids = np.array(read_table(index_dir / "ids").column("doc_id").to_pylist(), dtype=object)
        self._scan = len(self._doc_ids) <= int(getattr(self.index_config, "exact_threshold", 0))
        self._row_of = {doc_id: row for row, doc_id in enumerate(self._doc_ids)}
        need_ann = "dense" in self.miners or not self._scan
        self._ann = AnnIndex.load(index_dir / "faiss", self.index_config) if need_ann else None
        self._bm25 = BM25Index.load(Path(self.bm25_dir), self.bm25_config) if self.score_bm25 else None

    def _scan_ranks(self, queries, wanted):
        if not wanted:
            return {}
        qs = sorted(wanted)
        q = np.asarray(queries[qs], dtype=np.float64)
        higher = {(i, slot): 0 for i in qs for slot, _, _ in wanted[i]}
        for start in range(0, len(self._doc_ids), SCAN_CHUNK):
            stop = min(start + SCAN_CHUNK, len(self._doc_ids))
            scores = self._vectors.rows(start, stop).astype(np.float64) @ q.T
            for column, i in enumerate(qs):
                s = scores[:, column]
                for slot, row, score in wanted[i]:
                    count = int(np.count_nonzero(s > score))
                    if start <= row < stop and s[row - start] > score:
                        count -= 1
                    higher[(i, slot)] += count
        return {key: value + 1 for key, value in higher.items()}

    def transform(self, batch: pa.Table) -> pa.Table:  # noqa: C901 - kept verbatim
        n = batch.num_rows
        queries = batch.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        queries = np.ascontiguousarray(queries.reshape(n, -1), dtype=np.float32)
        masks = [set(m) for m in batch.column("mask_ids").to_pylist()]
        texts = batch.column("text").to_pylist()
        positives = batch.column("positive_ids").to_pylist()
        extra = max((len(m) for m in masks), default=0)
        k = self.range_max + extra
        found = [dict() for _ in range(n)]
        pos_rows = [np.array([self._row_of[d] for d in positives[i]], dtype=np.int64) for i in range(n)]
        ann_rows = np.zeros((n, 0), dtype=np.int64)
        depth = 0
        if self._ann is not None:
            depth = min(k, len(self._doc_ids))
            _, ann_rows = self._ann.search(queries, depth)
        bm25_ids, bm25_scores = [], []
        if self._bm25 is not None and "bm25" in self.miners:
            bm25_ids, bm25_scores = self._bm25.search(texts, k, n_threads=int(self.resources.num_cpus))
        vectors = _OldBatchVectors(self._vectors, np.concatenate(
            [*pos_rows, ann_rows[ann_rows >= 0], np.array([self._row_of[d] for ids in bm25_ids for d in ids], dtype=np.int64)]))
        pos_scores = [vectors.exact(queries[i], pos_rows[i]) for i in range(n)]
        pos_ranks = [[None] * len(pos_rows[i]) for i in range(n)]
        if self._ann is not None:
            for i in range(n):
                valid = ann_rows[i][ann_rows[i] >= 0]
                scores = vectors.exact(queries[i], valid)
                for slot, (row, score) in enumerate(zip(pos_rows[i], pos_scores[i])):
                    if row in valid:
                        pos_ranks[i][slot] = 1 + int(np.count_nonzero((scores > score) & (valid != row)))
                if "dense" not in self.miners:
                    continue
                ids = self._doc_ids[valid]
                order = sorted(range(len(valid)), key=lambda j: (-scores[j], ids[j]))
                ranked = [(ids[j], float(scores[j])) for j in order if ids[j] not in masks[i]]
                found[i]["dense"] = {d: (r, s) for r, (d, s) in enumerate(ranked[: self.range_max], start=1)}
        for i in range(len(bm25_ids)):
            ranked = [(d, s) for d, s in zip(bm25_ids[i], bm25_scores[i]) if d not in masks[i]]
            found[i]["bm25"] = {d: (r, s) for r, (d, s) in enumerate(ranked[: self.range_max], start=1)}
        missing = {i: [(slot, int(pos_rows[i][slot]), float(pos_scores[i][slot])) for slot, r in enumerate(pos_ranks[i]) if r is None]
                   for i in range(n)}
        missing = {i: v for i, v in missing.items() if v}
        if self._scan:
            for (i, slot), rank in self._scan_ranks(queries, missing).items():
                pos_ranks[i][slot] = rank
        else:
            for i, slots in missing.items():
                for slot, _, _ in slots:
                    pos_ranks[i][slot] = depth + 1
        columns = {name: [] for name in schemas.CANDIDATES.names if name not in batch.column_names}
        for i in range(n):
            sources = found[i]
            fused = {}
            for per_source in sources.values():
                for doc_id, (rank, _) in per_source.items():
                    fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (self.rrf_k + rank)
            candidate_ids = sorted(fused, key=lambda d: (-fused[d], d))
            cand_rows = np.array([self._row_of[d] for d in candidate_ids], dtype=np.int64)
            dense = vectors.exact(queries[i], cand_rows)
            columns["positive_dense_scores"].append(pos_scores[i].tolist())
            columns["positive_ranks"].append(pos_ranks[i])
            similarity = vectors.cosines(cand_rows, pos_rows[i])
            columns["positive_similarity"].append(
                similarity.max(axis=1).astype(np.float32).tolist() if similarity.shape[1] else [None] * len(candidate_ids))
            columns["candidate_ids"].append(candidate_ids)
            columns["sources"].append([[s for s in self.miners if d in sources.get(s, {})] for d in candidate_ids])
            columns["dense_scores"].append(dense.tolist())
            columns["dense_ranks"].append([sources.get("dense", {}).get(d, (None,))[0] for d in candidate_ids])
            if self._bm25 is not None:
                bm25_known = sources.get("bm25", {})
                missing = [d for d in candidate_ids if d not in bm25_known]
                extra_scores = dict(zip(missing, self._bm25.score(texts[i], missing))) if missing else {}
                columns["bm25_scores"].append([bm25_known[d][1] if d in bm25_known else extra_scores[d] for d in candidate_ids])
                columns["bm25_ranks"].append([bm25_known.get(d, (None,))[0] for d in candidate_ids])
                columns["positive_bm25_scores"].append(self._bm25.score(texts[i], positives[i]))
            else:
                columns["bm25_scores"].append(None)
                columns["bm25_ranks"].append(None)
                columns["positive_bm25_scores"].append(None)
            columns["fused_ranks"].append(list(range(1, len(candidate_ids) + 1)))
            top = self.similarity_top
            if top:  # the cosine to the nearest of the first `top` candidates; none for those
                nearest = vectors.cosines(cand_rows, cand_rows[:top]).max(axis=1).astype(np.float32).tolist()
                columns["top_similarity"].append([None] * min(top, len(nearest)) + nearest[top:])
            else:
                columns["top_similarity"].append(None)
        out = batch.drop_columns(["embedding"])
        for name in schemas.CANDIDATES.names[len(schemas.QUERIES):]:
            out = out.append_column(name, pa.array(columns[name], type=schemas.CANDIDATES.field(name).type))
        return out


@pytest.fixture(scope="module")
def mined(tmp_path_factory, small_beir):
    """One default run (dense + BM25 miners, exact index) over the Cranfield subset: its work dir
    holds the embeddings, the index and the BM25 index every test reuses."""
    root = tmp_path_factory.mktemp("vectorised")
    # Short sequences embed the subset quickly; the vectors are as real as any.
    config = MineConfig(beir=small_beir, out=root / "out", work_dir=root / "work", miners=["dense", "bm25"],
                        positives="best", num_negatives=3, runner="local", max_seq_length=32)
    run_mine(config, progress=False)
    return root


def _stage_dir(work: Path, name: str) -> Path:
    found = sorted(p for p in work.glob(f"{name}-*") if p.is_dir())
    assert found, f"no {name} stage in {work}"
    return found[0]


def _stage_args(work: Path, **kwargs) -> dict:
    """The candidates stage's arguments over the module run's index files, batches of 7."""
    from hardneg.stages.engines.faiss_index import IndexConfig
    from hardneg.stages.engines.bm25 import BM25Config

    args = dict(miners=["dense", "bm25"], range_max=20, rrf_k=60, index_dir=_stage_dir(work, "index"),
                index_config=IndexConfig(gpu="off"), bm25_dir=_stage_dir(work, "bm25_index"),
                bm25_config=BM25Config(), batch_size=7)
    return {**args, **kwargs}


def _both(work: Path, queries: pa.Table, **kwargs) -> tuple[pa.Table, pa.Table]:
    args = _stage_args(work, **kwargs)
    new, old = CandidatesStage(**args), _PerQuery(**args)
    tables = []
    for stage in (new, old):
        # Uneven batches: the output must not depend on how queries are grouped.
        parts = [stage(queries.slice(s, 7)) for s in range(0, queries.num_rows, 7)]
        tables.append(pa.concat_tables(parts))
    return tables[0], tables[1]


def _assert_same(new: pa.Table, old: pa.Table) -> None:
    assert new.schema == old.schema
    for name in new.column_names:
        assert new.column(name).to_pylist() == old.column(name).to_pylist(), name
    assert new.equals(old)


@pytest.fixture(scope="module")
def queries(mined) -> pa.Table:
    return read_table(_stage_dir(mined / "work", "embed_queries"))


@pytest.mark.parametrize("kwargs", [
    {},  # dense + BM25 miners, exact index: positive ranks from the exact scan
    {"miners": ["dense"], "score_bm25": True},  # BM25 only scores the dense candidates
    {"miners": ["bm25"]},  # BM25 alone; dense scores kept beside
    {"miners": ["bm25", "dense"], "range_max": 3, "rrf_k": 1},  # shallow: many positives outside the search
    {"miners": ["dense"], "score_bm25": False, "bm25_dir": None},  # no BM25 at all: null columns
    {"similarity_top": 3},  # each candidate's cosine to the first three (pseudo_relevance)
])
def test_vectorised_candidates_equal_the_per_query_reference(mined, queries, kwargs):
    new, old = _both(mined / "work", queries, **kwargs)
    assert new.num_rows == queries.num_rows
    assert sum(len(c) for c in new.column("candidate_ids").to_pylist()) > 0
    _assert_same(new, old)


def test_vectorised_candidates_equal_the_reference_on_an_approximate_index(mined, queries, tmp_path):
    """IVF with fp16 codes above a zero exact threshold: positives outside the searched depth get
    the lower bound depth + 1, not a scan."""
    from hardneg.stages.engines.faiss_index import IndexConfig, build_index

    work = mined / "work"
    index = tmp_path / "index"
    shutil.copytree(_stage_dir(work, "index"), index, ignore=shutil.ignore_patterns("faiss"))
    config = IndexConfig(index="IVF8,SQfp16", nprobe=2, exact_threshold=0, gpu="off")
    build_index(np.load(index / "vectors.npy", mmap_mode="r"), config, index / "faiss")
    new, old = _both(work, queries, index_dir=index, index_config=config, range_max=5)
    ranks = [r for rs in new.column("positive_ranks").to_pylist() for r in rs]
    assert 6 in ranks  # some positive fell outside the depth-6 search: the lower bound was used
    _assert_same(new, old)


def test_rank_bm25_engine_matches_the_reference(mined, queries, tmp_path, small_beir):
    from hardneg.stages.engines.bm25 import BM25Config, BM25Index

    config = BM25Config(engine="rank_bm25")
    corpus = read_table(_stage_dir(mined / "work", "ingest") / "corpus")
    BM25Index.build(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist(), config).save(tmp_path / "bm25")
    new, old = _both(mined / "work", queries, bm25_dir=tmp_path / "bm25", bm25_config=config)
    _assert_same(new, old)


def test_a_whole_run_writes_the_rows_of_the_reference(mined, small_beir, tmp_path, monkeypatch):
    """The final output of a run whose candidates stage is the per-query reference equals the
    output of the module's run (made with the vectorised stage)."""
    import hardneg.stages.candidates as candidates  # the plan builds the stage from this module

    work = tmp_path / "work"
    shutil.copytree(mined / "work", work, ignore=shutil.ignore_patterns(".lock", ".tmp-*", "candidates-*", "filter-*",
                                                                         "sample-*"))
    monkeypatch.setattr(candidates, "CandidatesStage", _PerQuery)
    config = MineConfig(beir=small_beir, out=tmp_path / "out", work_dir=work, miners=["dense", "bm25"],
                        positives="best", num_negatives=3, runner="local", max_seq_length=32)
    result = run_mine(config, progress=False)
    assert "candidates" in result.computed
    ours, reference = datasets.load_from_disk(str(mined / "out")), datasets.load_from_disk(str(tmp_path / "out"))
    assert ours.num_rows == reference.num_rows > 0
    assert ours.to_list() == reference.to_list()


def test_batches_side_by_side_write_the_shards_of_one_at_a_time(mined, queries, tmp_path):
    """The in-process runner computes `threads` candidates batches at once, each on one core of
    its own thread: the shards it writes are those of one batch at a time."""
    import threading

    from hardneg.pipeline.executors.local import compute_in_process
    from hardneg.stages.io import ShardWriter

    class Recorded(CandidatesStage):
        def transform(self, batch):
            self.threads_seen.add(threading.current_thread().name)
            return super().transform(batch)

    rows = tmp_path / "queries"
    with ShardWriter(rows) as writer:
        writer.write(queries)
    args = _stage_args(mined / "work", threads=2)
    side, alone = Recorded(**args), Recorded(**args)
    alone.local_batches = 1
    for stage, out in ((side, tmp_path / "side"), (alone, tmp_path / "alone")):
        stage.threads_seen = set()
        assert compute_in_process(stage, rows, out, progress=False) == queries.num_rows
    assert side.local_batches == 2 and len({n for n in side.threads_seen if n.startswith("hardneg-candidates")}) == 2
    assert alone.threads_seen == {threading.current_thread().name}
    assert read_table(tmp_path / "side").equals(read_table(tmp_path / "alone"))


def test_batch_vectors_widen_alike_with_and_without_numba(tmp_path, monkeypatch):
    """A batch's stored vectors come back as float64 the same with the compiled gather and with
    numpy's (numba absent); rows < 0 give zero vectors; a second batch in the same thread reuses
    the slot table and still finds its own rows. The sort-based unique helpers agree with
    np.unique."""
    import hardneg.stages.candidates as candidates

    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", matrix)
    source = VectorFile(tmp_path / "v.npy")
    assert np.array_equal(candidates.sorted_unique(np.array([7, 3, 7, 0, 3])), np.array([0, 3, 7]))
    keys = rng.integers(0, 40, 300)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    mine = candidates._unique_first_inverse(keys)
    assert np.array_equal(mine[0], first) and np.array_equal(mine[1], inverse.reshape(-1))
    for rows in (np.array([9, 2, 41, 2, 17]), np.array([3, 44, 9, 0])):
        vectors = candidates._BatchVectors(source, rows)
        grid = np.array([[rows[0], -1, rows[1]], [rows[-1], rows[2], -1]])
        compiled = vectors._get(grid)
        monkeypatch.setattr(candidates, "_compiled_widen", lambda: None)
        plain = vectors._get(grid)
        monkeypatch.undo()
        expected = np.where((grid >= 0)[..., None], matrix[np.maximum(grid, 0)].astype(np.float64), 0.0)
        assert compiled.dtype == plain.dtype == np.float64
        assert np.array_equal(compiled, expected) and np.array_equal(plain, expected)
