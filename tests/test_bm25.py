"""Tests for stages.engines.bm25: tokenisation, bm25s == BM25Okapi parity on Cranfield,
persistence, score()/search() agreement, k1/b, ties and edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import bm25s
import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from hardneg.stages.engines.bm25 import BM25Config, BM25Index, tokenize, tokenize_ids

CRANFIELD = Path(__file__).parent.parent / "examples" / "cranfield"
K = 20
ENGINES = ["bm25s", "rank_bm25"]


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def cranfield() -> tuple[list[str], list[str], list[str]]:
    docs = _read_jsonl(CRANFIELD / "corpus.jsonl")
    queries = _read_jsonl(CRANFIELD / "queries.jsonl")
    doc_ids = [d["_id"] for d in docs]
    texts = [f"{d.get('title', '')} {d['text']}".strip() for d in docs]
    return doc_ids, texts, [q["text"] for q in queries]


@pytest.fixture(scope="module")
def indexes(cranfield) -> dict[str, BM25Index]:
    doc_ids, texts, _ = cranfield
    return {e: BM25Index.build(doc_ids, texts, BM25Config(engine=e)) for e in ENGINES}


@pytest.fixture(scope="module")
def results(indexes, cranfield) -> dict[str, tuple[list[list[str]], list[list[float]]]]:
    queries = cranfield[2]
    return {e: idx.search(queries, K) for e, idx in indexes.items()}


def _reference_top_k(okapi: BM25Okapi, doc_ids: list[str], tokens: list[str], k: int):
    """Ground truth straight from rank_bm25: sort all docs by (-score, doc id)."""
    scores = okapi.get_scores(tokens)
    ranked = sorted((-s, d) for s, d in zip(scores.tolist(), doc_ids) if s > 0)[:k]
    return [d for _, d in ranked], [-s for s, _ in ranked]


# --------------------------------------------------------------------------- tokenisation


def test_tokenize_lowercases_removes_stopwords_and_stems():
    cfg = BM25Config()
    assert tokenize(["The Running DOGS of a Jet-Engine, x"], cfg) == [
        ["run", "dog", "jet", "engin"]  # "the"/"of"/"a" are stopwords, "x" too short
    ]
    assert tokenize(["Running dogs"], BM25Config(stemmer=None)) == [["running", "dogs"]]
    assert tokenize(["the dogs"], BM25Config(stopwords=None)) == [["the", "dog"]]
    assert tokenize(["", "the of"], cfg) == [[], []]


MIXED = ["The Flow of AIR over a wing_tip, at Mach-2.5!", "", "a I x", "Café naïve façade — ÉCOLE résumé 2024",
         "über Straße ǅemal İstanbul", "boundary-layer\ttransition\n123 45a b_c __", "the of and", "ÀÉ 日本語 テキスト",
         "FLOWS flowing flowed", "’curly quotes’ and “more” flows"]


@pytest.mark.parametrize("cfg", [BM25Config(), BM25Config(stemmer=None), BM25Config(stopwords=None)])
def test_arrow_tokenisation_equals_the_python_code(cfg, cranfield):
    """`tokenize_ids` (Arrow compute for ASCII texts, the Python code for the rest) gives each
    text `tokenize`'s tokens, and numbers them in order of first occurrence."""
    for texts in (MIXED, cranfield[1] + MIXED, MIXED[3:4] + cranfield[2]):
        expected = tokenize(texts, cfg)
        ids, offsets, vocabulary = tokenize_ids(texts, cfg)
        terms = vocabulary.to_pylist()
        assert [[terms[i] for i in ids[a:b]] for a, b in zip(offsets[:-1], offsets[1:])] == expected
        assert terms == list(dict.fromkeys(t for tokens in expected for t in tokens))


def test_prepared_queries_are_the_index_term_ids_of_their_tokens(indexes, cranfield):
    index = indexes["bm25s"]
    queries = cranfield[2] + MIXED + ["zzzunknownword flow"]
    prepared = index.prepare(queries)
    expected = [index._retriever.get_tokens_ids(tokens) for tokens in tokenize(queries, index.cfg)]
    assert [list(p) for p in prepared] == expected
    assert all(p.dtype == np.int64 for p in prepared)


def test_config_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError):
        BM25Config(stemmer="klingon")
    with pytest.raises(ValueError):
        BM25Config(stopwords="klingon")
    with pytest.raises(ValueError):
        BM25Config(epsilon=0.3)  # extra="forbid"


# --------------------------------------------------------------------------- parity


def test_cranfield_exercises_the_negative_idf_floor(cranfield):
    _, texts, _ = cranfield
    okapi = BM25Okapi(tokenize(texts, BM25Config()))
    floored = [t for t, v in okapi.idf.items() if v == okapi.epsilon * okapi.average_idf]
    assert floored, "parity below would not cover BM25Okapi's epsilon floor"


def test_engines_agree_with_bm25okapi_on_all_cranfield_queries(cranfield, results):
    doc_ids, texts, queries = cranfield
    okapi = BM25Okapi(tokenize(texts, BM25Config()), k1=1.5, b=0.75)
    q_tokens = tokenize(queries, BM25Config())
    assert len(queries) == 225
    for qi, tokens in enumerate(q_tokens):
        ref_ids, ref_scores = _reference_top_k(okapi, doc_ids, tokens, K)
        for engine in ENGINES:
            ids, scores = results[engine][0][qi], results[engine][1][qi]
            assert ids == ref_ids, (engine, qi)
            np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-4)
    # Same ids AND the same floats in both engines (bit-identical by construction).
    assert results["bm25s"] == results["rank_bm25"]


def test_okapi_matrix_equals_native_bm25s_except_the_floor(cranfield, indexes):
    """Our bm25s matrix is stock bm25s atire/robertson, except for negative-idf terms."""
    _, texts, _ = cranfield
    tokens = tokenize(texts, BM25Config())
    native = bm25s.BM25(k1=1.5, b=0.75, method="atire", idf_method="robertson", dtype="float64")
    native.index(tokens, show_progress=False)
    okapi = BM25Okapi(tokens)
    ours = indexes["bm25s"]._retriever
    for term, idf in okapi.idf.items():
        got = ours.get_scores([term])
        want = native.get_scores([term])
        if idf == okapi.epsilon * okapi.average_idf:
            assert np.all(want == 0) and np.all(got[got != 0] > 0)  # bm25s clamps to 0
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("engine", ENGINES)
def test_save_load_roundtrip(engine, indexes, results, cranfield, tmp_path):
    indexes[engine].save(tmp_path)
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pickle"))
    loaded = BM25Index.load(tmp_path, BM25Config(engine=engine))
    assert loaded.search(cranfield[2], K) == results[engine]
    with pytest.raises(ValueError):
        BM25Index.load(tmp_path, BM25Config(engine=engine, k1=1.2))


@pytest.mark.parametrize("engine", ENGINES)
def test_score_agrees_with_search(engine, indexes, results, cranfield):
    idx = indexes[engine]
    queries = cranfield[2]
    for qi in range(0, len(queries), 15):
        ids, scores = results[engine][0][qi], results[engine][1][qi]
        assert idx.score(queries[qi], ids) == scores
    # A doc without any query term scores exactly 0; unknown ids are an error.
    assert idx.score("zzzunknownterm", ["1", "2"]) == [0.0, 0.0]
    assert idx.score(queries[0], []) == []
    with pytest.raises(KeyError):
        idx.score(queries[0], ["no-such-doc"])


@pytest.mark.parametrize("engine", ENGINES)
def test_k1_and_b_are_honoured(engine, cranfield, results):
    doc_ids, texts, queries = cranfield
    cfg = BM25Config(engine=engine, k1=0.9, b=0.4)
    ids, scores = BM25Index.build(doc_ids, texts, cfg).search(queries[:25], K)
    okapi = BM25Okapi(tokenize(texts, cfg), k1=0.9, b=0.4)
    for qi, tokens in enumerate(tokenize(queries[:25], cfg)):
        ref_ids, ref_scores = _reference_top_k(okapi, doc_ids, tokens, K)
        assert ids[qi] == ref_ids
        np.testing.assert_allclose(scores[qi], ref_scores, rtol=0, atol=1e-4)
    assert scores != results[engine][1][:25]


@pytest.mark.parametrize("engine", ENGINES)
def test_ties_broken_by_doc_id_string_order(engine):
    # Four identical docs tie exactly; "10" < "3" < "7" < "9" as strings. The
    # k=2 cut falls inside the tie group, so the smallest ids must win.
    doc_ids = ["9", "3", "10", "7", "a", "b"]
    texts = ["red apple"] * 4 + ["green pear", "blue sky"]
    idx = BM25Index.build(doc_ids, texts, BM25Config(engine=engine))
    ids, scores = idx.search(["apple"], 2)
    assert ids == [["10", "3"]] and scores[0][0] == scores[0][1] > 0
    ids, _ = idx.search(["apple pear"], 10)
    assert ids == [["a", "10", "3", "7", "9"]]  # rarer "pear" first; no zero-score docs


@pytest.mark.parametrize("engine", ENGINES)
def test_edge_queries(engine):
    idx = BM25Index.build(["d1", "d2", "d3"], ["red apple", "green pear", "blue"], BM25Config(engine=engine))
    ids, scores = idx.search(["", "the of", "zzz unknown", "apple"], k=10)  # k > corpus size
    assert ids == [[], [], [], ["d1"]] and scores[:3] == [[], [], []]
    assert idx.search([], 5) == ([], [])
    with pytest.raises(ValueError):
        idx.search(["apple"], 0)
    with pytest.raises(ValueError):
        BM25Index.build(["a", "a"], ["x y", "z w"], BM25Config(engine=engine))


def test_batched_search_matches_single_batch(indexes, results, cranfield):
    # Small batches and threaded retrieval must not change anything.
    got = indexes["bm25s"].search(cranfield[2], K, batch_size=7, n_threads=2)
    assert got == results["bm25s"]


def _per_query(ids: np.ndarray, rows: np.ndarray, scores: np.ndarray, n: int, doc_ids: list[str]):
    out_ids, out_scores = [[] for _ in range(n)], [[] for _ in range(n)]
    for q, r, s in zip(ids.tolist(), rows.tolist(), scores.tolist()):
        out_ids[q].append(doc_ids[r])
        out_scores[q].append(s)
    return out_ids, out_scores


@pytest.mark.parametrize("engine", ENGINES)
def test_batched_rows_equal_search_and_score(engine, indexes, results, cranfield, monkeypatch):
    """search_rows / score_rows (a batch at once, sparse) give `search`'s and `score`'s values bit
    for bit: in one group, in many groups over threads, and with the dense path for queries whose
    postings cover much of the corpus."""
    import hardneg.stages.engines.bm25 as bm25_engine

    idx, queries = indexes[engine], cranfield[2]
    doc_ids = idx.doc_ids
    tokens = idx.prepare(queries)
    settings = [(bm25_engine.POSTINGS_BUDGET, bm25_engine.DENSE_SHARE, 1)]
    if engine == "bm25s":
        settings += [(500, bm25_engine.DENSE_SHARE, 3), (1 << 23, 1 << 30, 2)]  # many groups; all dense
    for budget, share, threads in settings:
        monkeypatch.setattr(bm25_engine, "POSTINGS_BUDGET", budget)
        monkeypatch.setattr(bm25_engine, "DENSE_SHARE", share)
        got = _per_query(*idx.search_rows(tokens, K, n_threads=threads), len(queries), doc_ids)
        assert got == results[engine], (budget, share, threads)
    rng = np.random.default_rng(0)
    q = np.sort(rng.integers(0, len(queries), 3000))
    rows = rng.integers(0, len(doc_ids), 3000)
    # score_rows: whole-corpus score vectors on a corpus this small, the sparse gather otherwise.
    for cells in (bm25_engine.DENSE_SCORE_CELLS, 0):
        monkeypatch.setattr(bm25_engine, "DENSE_SCORE_CELLS", cells)
        scores = idx.score_rows(tokens, q, rows)
        for qi in np.unique(q)[::10].tolist():
            at = np.flatnonzero(q == qi)
            assert scores[at].tolist() == idx.score(queries[qi], [doc_ids[r] for r in rows[at].tolist()]), cells


def test_sparse_retrieval_with_non_positive_weights(monkeypatch):
    """A corpus whose weights are not all positive (here a term in exactly half of the documents:
    idf 0; the negative floor of terms in more than half is the other case): the sparse path
    cannot tell a summed document by its running sum being non-zero, and must still return
    `search`'s rows and scores, each document once, and `score`'s values."""
    import hardneg.stages.engines.bm25 as bm25_engine

    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    texts = [" ".join([*rng.choice(words[:3] if i % 5 else words, size=6), *(["half"] if i < 30 else []),
                       *(["rare"] if i % 3 == 0 else [])]) for i in range(60)]
    ids = [f"d{i:02d}" for i in range(60)]
    cfg = BM25Config(stopwords=None, stemmer=None)
    idx = BM25Index.build(ids, texts, cfg)
    assert idx._retriever.scores["data"].min() <= 0  # the case under test
    queries = ["half rare", "alpha beta", "omega alpha half", "sigma delta gamma", "beta beta omega", "zeta"]
    expected = idx.search(queries, 60)  # every match: a document counted twice would show
    monkeypatch.setattr(bm25_engine, "DENSE_SHARE", 1)  # every query takes the sparse path
    tokens = idx.prepare(queries)
    assert _per_query(*idx.search_rows(tokens, 60), len(queries), idx.doc_ids) == (expected[0], expected[1])
    q = np.repeat(np.arange(len(queries)), 60)
    rows = np.tile(np.arange(60), len(queries))
    scores = idx.score_rows(tokens, q, rows)
    for i, text in enumerate(queries):
        assert scores[q == i].tolist() == idx.score(text, ids)


def test_numba_kernels_equal_the_numpy_code(cranfield, monkeypatch):
    """The numba kernels of search_rows / score_rows give the numpy code's rows and float64 scores
    bit for bit, in the same order: on Cranfield with duplicated documents (exact ties, cut at the
    k-th score) and short ones, queries with repeated terms, one group or many over threads, some
    queries dense; score_rows against both numpy paths (whole-corpus scores, sparse gather)."""
    import hardneg.stages.engines.bm25 as bm25_engine

    if bm25_engine.numba is None:
        pytest.skip("numba is not installed")
    doc_ids, texts, queries = cranfield
    dups = list(range(0, len(texts), 3))
    idx = BM25Index.build(doc_ids + [f"{doc_ids[i]}x" for i in dups] + [f"s{i}" for i in range(40)],
                          texts + [texts[i] for i in dups] + ["flow pressure"[: 4 + i % 10] for i in range(40)],
                          BM25Config())
    queries = queries + [f"{q} {q}" for q in queries[:50]] + ["flow flow flow", "flow pressure flow", "zzzz", ""]
    tokens = idx.prepare(queries)

    def both(call):
        out = {}
        for use in (False, True):
            monkeypatch.setattr(bm25_engine, "USE_NUMBA", use)
            out[use] = call()
        return out[False], out[True]

    for k in (1, 5, 60, 5000):
        for budget, share, threads in [(bm25_engine.POSTINGS_BUDGET, bm25_engine.DENSE_SHARE, 1), (2000, 1, 2)]:
            monkeypatch.setattr(bm25_engine, "POSTINGS_BUDGET", budget)
            monkeypatch.setattr(bm25_engine, "DENSE_SHARE", share)
            old, new = both(lambda: idx.search_rows(tokens, k, n_threads=threads))
            assert len(old[0]) and all(np.array_equal(a, b) for a, b in zip(old, new)), (k, budget, share)
            assert [a.dtype for a in old] == [b.dtype for b in new]
    rng = np.random.default_rng(0)
    q = np.sort(rng.integers(0, len(queries), 5000))
    rows = rng.integers(0, len(idx.doc_ids), 5000)
    for cells in (bm25_engine.DENSE_SCORE_CELLS, 0):
        monkeypatch.setattr(bm25_engine, "DENSE_SCORE_CELLS", cells)
        old, new = both(lambda: idx.score_rows(tokens, q, rows))
        assert (old > 0).any() and np.array_equal(old, new) and new.dtype == np.float64, cells
    # Pairs not grouped by query: the kernel's per-query term map is rebuilt at every change.
    shuffled = rng.permutation(len(q))
    old, new = both(lambda: idx.score_rows(tokens, q[shuffled], rows[shuffled]))
    assert np.array_equal(old, new)


def test_importing_hardneg_does_not_start_an_installed_jax(tmp_path: Path) -> None:
    # bm25s warms JAX up at import where JAX is installed, and JAX then takes 75% of a GPU's
    # memory in each process (seen on an H200: faiss in the Ray actors could not allocate).
    # A stand-in `jax` that records its import and its use, first on the path of a fresh process.
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "jax"
    fake.mkdir(parents=True)
    log = tmp_path / "jax.log"
    (fake / "__init__.py").write_text(f"open({str(log)!r}, 'a').write('imported\\n')\n")
    (fake / "lax.py").write_text(f"def top_k(x, k):\n    open({str(log)!r}, 'a').write('backend started\\n')\n"
                                 "    return x[:k], list(range(k))\n")
    root = Path(__file__).resolve().parent.parent
    probe = ("import sys, hardneg.pipeline.api, hardneg.stages.engines.bm25 as engine\n"
             "import bm25s.selection\n"
             "print('jax' in sys.modules, bm25s.selection.JAX_IS_AVAILABLE)\n"
             "import jax\n")  # the user's own `import jax` still works afterwards
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{root}"}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]
    assert log.read_text() == "imported\n"  # only the user's import; bm25s never ran JAX
