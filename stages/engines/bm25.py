"""BM25 retrieval for hard-negative mining, with two interchangeable engines.

Engines
-------
* ``rank_bm25``: ``rank_bm25.BM25Okapi`` -- the reference. Simple and slow: every
  query walks every document in Python.
* ``bm25s`` (default): bm25s's eager sparse index (a CSC matrix of precomputed
  per-(document, term) BM25 weights, one column per vocabulary term) and its
  sparse-matrix query scoring. Orders of magnitude faster and scales to millions
  of short documents, because a query only touches the postings of its own terms.

How bm25s is made to score exactly like BM25Okapi
-------------------------------------------------
BM25Okapi scores ``sum_t idf(t) * tf*(k1+1) / (tf + k1*(1 - b + b*dl/avgdl))`` with
``idf(t) = log((N - n_t + 0.5) / (n_t + 0.5))``, and replaces every negative idf
(terms in more than half of the documents) by ``epsilon * mean(idf)``
(epsilon=0.25, mean over the whole vocabulary, negatives included).

* Term-frequency part: bm25s ``method="atire"`` is exactly the saturation above.
  ("robertson"/"lucene" drop the ``(k1+1)`` factor, so their scores are scaled by
  ``1/(k1+1)``.)
* idf part: bm25s ``idf_method="robertson"`` is the same log ratio, but bm25s clamps
  negative values to 0 (``allow_negative`` is not reachable from ``bm25s.BM25``),
  and no bm25s idf method has the epsilon floor ("lucene"/"atire"/"bm25l"/"bm25+"
  are different formulas). So bm25s cannot reproduce BM25Okapi natively whenever a
  term occurs in more than half of the documents.

Choice: we compute the weight matrix ourselves -- BM25Okapi's idf with its
epsilon floor, times bm25s's "atire" term-frequency part -- in bm25s's own eager
index layout (``data``/``indices``/``indptr`` CSC arrays + ``vocab_dict``) and hand it
to a ``bm25s.BM25(method="atire", idf_method="robertson")`` object. bm25s then
scores queries from the sparse matrix (``get_scores_from_ids``) and does the
(pickle-free) .npy/JSON persistence. A test checks, term by term on Cranfield,
that this matrix equals bm25s's native atire/robertson index except for the
floored terms (which bm25s zeroes): the floor is the only deviation.
The matrix is built with vectorised numpy (one sort of (term, doc) keys), which
is also much faster than bm25s's per-document Python loops at 1M documents.

The weights are float64 and evaluated with the same expression order as
``BM25Okapi.get_scores``; bm25s's numpy backend then sums a query's terms in
query order, as BM25Okapi does. Hence the two engines produce bit-identical
scores, and exact ties (duplicate documents are common in mined corpora) are
ties in both, so the doc-id tie-break gives identical lists.

Top-k selection, and why not ``bm25s.BM25.retrieve``
--------------------------------------------------
``search`` returns, per query, up to k documents with score > 0, sorted by score
descending and then doc id ascending (Python string order). Both engines share
one selection step: take the docs with score > 0, ``argpartition`` among those
only, keep the whole tie group at the k-th score, and sort by (-score, doc-id rank).
We do not use bm25s's ``retrieve``. With the numpy backend (the one our indexes
are built and saved with) its top-k is ``np.argpartition`` over the full length-N score
vector. That is slow on the mostly-zero vectors of a large corpus of short
documents. On 1M 12-word documents we measured 5 queries/s through ``retrieve``
and 120 queries/s with this selection, with identical results. ``retrieve`` also
picks arbitrarily among docs tied at the k-th score, so it is not deterministic.
Memory stays bounded: queries are tokenised and scored ``batch_size`` at a time,
and only one length-N score vector per worker thread exists at any moment.
No query x corpus matrix is ever built.
``search_rows`` and ``score_rows`` run numba kernels (``USE_NUMBA``) that do the same
float64 additions in the same order and the same selection as their numpy code,
which stays as the fallback without numba: the outputs are bit-identical.

Both engines share ONE tokenisation (:func:`tokenize`), applied before indexing, so
they see identical tokens. Nothing is pickled: indexes are saved as JSON, .npy
(``allow_pickle=False``) and parquet.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import Stemmer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from rank_bm25 import BM25Okapi

from hardneg.stages.base import GlobalStage, InputError

try:  # compiled kernels for search_rows / score_rows; without numba the numpy code runs instead
    import numba
except ImportError:  # pragma: no cover - numba is a dependency, the fallback keeps the package working
    numba = None


def _import_bm25s_without_jax():
    """bm25s, imported as if JAX were not installed (unless the caller has imported JAX already).

    Where JAX is installed, importing bm25s runs a JAX top-k to warm JAX up, and that starts
    JAX's backend: on a GPU machine JAX then takes 75% of the GPU's memory in every process that
    imports hardneg, each Ray worker too. Seen on an H200 with jax[cuda] installed: the candidates
    actors' faiss could not allocate its 1.5 GiB of scratch memory and searched on the CPU. hardneg
    never calls bm25s's JAX top-k (it selects with numpy, see above), so bm25s need not see JAX."""
    if "jax" in sys.modules:
        import bm25s
        return bm25s
    sys.modules["jax"] = None  # `import jax` now raises ImportError, which bm25s expects
    try:
        import bm25s
    finally:
        del sys.modules["jax"]
    return bm25s


bm25s = _import_bm25s_without_jax()

# A user error (one line, exit 2), not a crash: BM25 has nothing to index.
_NO_TOKENS = ("the corpus has no tokens after tokenisation: BM25 (a miner, or the score a filter reads) "
              "cannot index it; drop bm25 from miners and filters")

# bm25s's default (= scikit-learn's) word pattern: runs of >= 2 word characters.
_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")
_EPSILON = 0.25  # BM25Okapi's default idf floor factor; we mirror it exactly.
POSTINGS_BUDGET = 1 << 23  # postings per group of queries in search_rows (the unit of work of a thread)
DENSE_SHARE = 4  # a query whose postings exceed 1/DENSE_SHARE of the corpus is scored densely
_FORMAT = "hardneg-bm25"
_FORMAT_VERSION = 1
# The numba kernels (bit-identical to the numpy code); False forces the numpy code (tests compare them).
USE_NUMBA = numba is not None
_BUILD_LOCK = threading.Lock()  # lazily built per-index structures (`_by_row`)


class BM25Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    engine: Literal["bm25s", "rank_bm25"] = "bm25s"
    k1: float = Field(1.5, gt=0.0)  # k1=0 makes BM25Okapi divide 0/0
    b: float = Field(0.75, ge=0.0, le=1.0)
    stopwords: str | None = "en"  # a bm25s stopword-list name ("en", "german", ...) or None
    stemmer: str | None = "english"  # a PyStemmer algorithm or None

    @field_validator("stopwords")
    @classmethod
    def _known_stopwords(cls, v: str | None) -> str | None:
        _stopword_set(v)  # raises ValueError on names bm25s does not know
        return v

    @field_validator("stemmer")
    @classmethod
    def _known_stemmer(cls, v: str | None) -> str | None:
        if v is not None and v not in Stemmer.algorithms():
            raise ValueError(f"unknown PyStemmer language {v!r}; one of {Stemmer.algorithms()}")
        return v


# --------------------------------------------------------------------------- tokenisation


@lru_cache(maxsize=None)
def _stopword_set(name: str | None) -> frozenset[str]:
    # bm25s's own name -> list resolver, so a name means exactly what it means to bm25s.
    return frozenset(bm25s.tokenization._infer_stopwords(name))


@lru_cache(maxsize=None)
def _stemmer(language: str) -> Stemmer.Stemmer:
    return Stemmer.Stemmer(language)


def tokenize(texts: list[str], cfg: BM25Config) -> list[list[str]]:
    """Lowercase, split on the word regex, drop stopwords, then stem.

    Stopwords are removed before stemming (as bm25s does), so the lists match their
    surface forms. Each distinct word is stemmed once per call. The reference of
    `tokenize_ids`, which the bm25s engine uses.
    """
    stop = _stopword_set(cfg.stopwords)
    docs = [[w for w in _TOKEN_RE.findall(t.lower()) if w not in stop] for t in texts]
    if cfg.stemmer is None:
        return docs
    words = list({w for d in docs for w in d})
    stem = dict(zip(words, _stemmer(cfg.stemmer).stemWords(words)))
    return [[stem[w] for w in d] for d in docs]


def tokenize_ids(texts, cfg: BM25Config) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """`tokenize` as (ids, offsets, vocabulary): text i's tokens are vocabulary[ids[offsets[i]:
    offsets[i + 1]]], and the vocabulary lists every token in order of first occurrence (the
    order BM25Okapi and `_okapi_bm25s` number them in).

    ASCII texts are split by Arrow compute, with no Python object per word: for ASCII, Python's
    lower() and its Unicode word class are Arrow's `ascii_lower` and [0-9a-z_], and the word
    regex's matches are the runs of word characters of length >= 2. Any other text goes through
    `tokenize`'s own Python code. Each distinct word is stemmed once."""
    texts = pa.array(texts, pa.large_string()) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = texts.fill_null("")
    n = len(texts)
    ascii_rows = pc.string_is_ascii(texts).to_numpy(zero_copy_only=False)
    words, row_of_word = _ascii_words(pc.ascii_lower(texts.filter(pa.array(ascii_rows))))
    row_of_word = np.flatnonzero(ascii_rows)[row_of_word]
    stop = _stopword_set(cfg.stopwords)
    keep = pc.and_(pc.greater_equal(pc.binary_length(words), 2),
                   pc.invert(pc.is_in(words, value_set=pa.array(sorted(stop), words.type))))
    words, row_of_word = words.filter(keep), row_of_word[keep.to_numpy(zero_copy_only=False)]
    other = np.flatnonzero(~ascii_rows)
    if len(other):  # the texts Arrow's ASCII rules do not cover: their words, in text order after the rest
        found = [[w for w in _TOKEN_RE.findall(t.lower()) if w not in stop] for t in texts.take(pa.array(other)).to_pylist()]
        words = pa.concat_arrays([words.cast(pa.large_string()),
                                  pa.array([w for ws in found for w in ws], pa.large_string())])
        row_of_word = np.concatenate([row_of_word, np.repeat(other, [len(ws) for ws in found])])
        order = np.argsort(row_of_word, kind="stable")  # each text's words from one source, in order
        words, row_of_word = words.take(pa.array(order)), row_of_word[order]
    encoded = pc.dictionary_encode(words)  # distinct words, numbered in order of first occurrence
    word_ids = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    distinct = encoded.dictionary
    if cfg.stemmer is not None:
        distinct = pa.array(_stemmer(cfg.stemmer).stemWords(distinct.to_pylist()), pa.large_string())
    # Stems numbered in order of first occurrence too: the distinct words are in that order.
    stems = pc.dictionary_encode(distinct)
    ids = stems.indices.to_numpy(zero_copy_only=False).astype(np.int64)[word_ids]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of_word, minlength=n), out=offsets[1:])
    return ids, offsets, stems.dictionary


# --------------------------------------------------------------------------- engines


def _ascii_words(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The runs of [0-9a-z_] of lowercased ASCII texts and the text each is from. A large input
    is split in a thread per core (Arrow's regex releases the GIL)."""
    from hardneg.stages.base import local_cpus

    def split(start: int, stop: int) -> tuple[pa.Array, np.ndarray]:
        runs = pc.split_pattern_regex(texts.slice(start, stop - start), r"[^0-9a-z_]+")
        return pc.list_flatten(runs), pc.list_parent_indices(runs).to_numpy().astype(np.int64) + start

    parts = max(1, min(local_cpus(), len(texts) // 100_000))
    bounds = np.linspace(0, len(texts), parts + 1).astype(int)
    if parts == 1:
        return split(0, len(texts))
    with ThreadPoolExecutor(max_workers=parts) as pool:
        pieces = list(pool.map(split, bounds[:-1], bounds[1:]))
    return pa.concat_arrays([w for w, _ in pieces]), np.concatenate([r for _, r in pieces])


def _okapi_bm25s(tok_ids: np.ndarray, offsets: np.ndarray, vocabulary: pa.Array, k1: float, b: float) -> bm25s.BM25:
    """A bm25s eager index whose weights are BM25Okapi's (see module docstring), from
    `tokenize_ids`'s output. Its vocabulary ids are in first-occurrence order: the order
    BM25Okapi builds its idf dict in, so the mean idf (epsilon floor) is summed in the same order."""
    n_docs = len(offsets) - 1
    vocab = dict(zip(vocabulary.to_pylist(), range(len(vocabulary))))
    if not vocab:
        raise InputError(_NO_TOKENS)
    doc_len = np.diff(offsets)
    doc_of_tok = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)

    # One sort of (term, doc) keys yields term frequencies in CSC order
    # (by term, then doc) -- no Python loop over postings, no dense matrix.
    keys, tf = np.unique(tok_ids * n_docs + doc_of_tok, return_counts=True)
    cols, rows = np.divmod(keys, n_docs)
    df = np.bincount(cols, minlength=len(vocab))
    indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])

    # BM25Okapi._calc_idf, verbatim in arithmetic (math.log, same sum order).
    idf = [math.log(n_docs - n + 0.5) - math.log(n + 0.5) for n in df.tolist()]
    floor = _EPSILON * (sum(idf) / len(idf))
    idf_arr = np.array([floor if v < 0 else v for v in idf], dtype=np.float64)

    # BM25Okapi.get_scores' expression, same operand order -> bit-identical weights.
    avgdl = int(doc_len.sum()) / n_docs
    tf_f = tf.astype(np.float64)
    dl = doc_len[rows]
    data = idf_arr[cols] * (tf_f * (k1 + 1) / (tf_f + k1 * (1 - b + b * dl / avgdl)))

    retriever = bm25s.BM25(
        k1=k1, b=b, method="atire", idf_method="robertson",
        dtype="float64", int_dtype="int32", backend="numpy",
    )
    retriever.scores = {
        "data": data,
        "indices": rows.astype(np.int32),
        "indptr": indptr,
        "num_docs": n_docs,
    }
    retriever.vocab_dict = vocab
    retriever.unique_token_ids_set = set(vocab.values())
    retriever.nonoccurrence_array = None
    return retriever


class BM25Index:
    """A BM25 index over (doc_id, text) pairs; see the module docstring."""

    def __init__(
        self,
        cfg: BM25Config,
        doc_ids: list[str],
        *,
        retriever: bm25s.BM25 | None = None,
        okapi: BM25Okapi | None = None,
        corpus_tokens: list[list[str]] | None = None,
    ) -> None:
        from hardneg.stages.io import DocIds

        self.cfg = cfg
        # The ids as an Arrow array with numpy lookups (no Python object per document);
        # `doc_ids` reads like the list it was.
        self._ids = DocIds(_id_array(doc_ids))
        self.doc_ids = _IdSequence(self._ids.array)
        self._retriever = retriever
        self._okapi = okapi
        self._corpus_tokens = corpus_tokens  # kept for rank_bm25 only (saved, rebuilt)
        # rank[i] = position of doc i in doc-id string order: the tie-break key.
        self._rank = self._ids.rank

    # ------------------------------------------------------------------ build / io

    @classmethod
    def build(cls, doc_ids: list[str], texts: list[str], cfg: BM25Config) -> "BM25Index":
        if len(doc_ids) != len(texts):
            raise ValueError(f"{len(doc_ids)} doc ids but {len(texts)} texts")
        if not len(doc_ids):
            raise ValueError("cannot index an empty corpus")
        if pc.count_distinct(_id_array(doc_ids)).as_py() != len(doc_ids):
            raise ValueError("doc ids must be unique")
        if cfg.engine == "bm25s":
            return cls(cfg, doc_ids, retriever=_okapi_bm25s(*tokenize_ids(texts, cfg), cfg.k1, cfg.b))
        tokens = tokenize(texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts, cfg)
        if not any(tokens):
            raise InputError(_NO_TOKENS)
        okapi = BM25Okapi(tokens, k1=cfg.k1, b=cfg.b, epsilon=_EPSILON)
        return cls(cfg, doc_ids, okapi=okapi, corpus_tokens=tokens)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "config": self.cfg.model_dump(),
            "num_docs": len(self.doc_ids),
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=2))
        pq.write_table(pa.table({"doc_id": self._ids.array}),
                       directory / "doc_ids.parquet")
        if self._retriever is not None:
            # bm25s writes .npy with allow_pickle=False plus JSON vocab/params.
            self._retriever.save(directory / "bm25s", allow_pickle=False, show_progress=False)
        else:
            # BM25Okapi is plain Python state; store its input and rebuild on load.
            tokens = pa.array(self._corpus_tokens, pa.list_(pa.string()))
            pq.write_table(pa.table({"tokens": tokens}), directory / "corpus_tokens.parquet")

    @classmethod
    def load(cls, directory: Path, cfg: BM25Config, *, mmap: bool = False) -> "BM25Index":
        """`mmap=True` maps the bm25s matrix's arrays read-only instead of reading them: every
        process of a machine that loads the same index shares one copy of its pages."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{directory} is not a {_FORMAT} v{_FORMAT_VERSION} index")
        stored = BM25Config.model_validate(meta["config"])
        # Tokenisation and k1/b are baked into the index: a different config
        # would silently give wrong scores, so refuse it.
        if stored != cfg:
            raise ValueError(f"index at {directory} was built with {stored}, not {cfg}")
        doc_ids = pq.read_table(directory / "doc_ids.parquet").column("doc_id").combine_chunks()
        if cfg.engine == "bm25s":
            retriever = bm25s.BM25.load(directory / "bm25s", allow_pickle=False, mmap=mmap)
            if retriever.scores["num_docs"] != len(doc_ids):
                raise ValueError(f"{directory}: bm25s index and doc_ids.parquet disagree")
            return cls(cfg, doc_ids, retriever=retriever)
        tokens = pq.read_table(directory / "corpus_tokens.parquet").column("tokens").to_pylist()
        okapi = BM25Okapi(tokens, k1=cfg.k1, b=cfg.b, epsilon=_EPSILON)
        return cls(cfg, doc_ids, okapi=okapi, corpus_tokens=tokens)

    # ------------------------------------------------------------------ queries

    def search(
        self,
        query_texts: list[str],
        k: int,
        *,
        batch_size: int = 1024,
        n_threads: int = 0,
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Top-k doc ids and scores per query (score > 0; score desc, then doc id asc).

        Queries are processed ``batch_size`` at a time so memory stays bounded
        (one score vector per thread in flight, k results kept). ``n_threads`` > 1
        scores a batch's queries in that many threads (bm25s only); rank_bm25 is
        always sequential.
        """
        if k < 1:
            raise ValueError("k must be >= 1")
        ids_out: list[list[str]] = []
        scores_out: list[list[float]] = []
        for start in range(0, len(query_texts), batch_size):
            batch = tokenize(query_texts[start : start + batch_size], self.cfg)
            if self._retriever is not None:
                rows = self._search_bm25s(batch, k, n_threads)
            else:
                rows = [self._top_k(self._okapi_scores(q), k) for q in batch]
            for idx, sc in rows:
                ids_out.append(self._ids.take(idx).to_pylist())
                scores_out.append(sc.tolist())
        return ids_out, scores_out

    def score(self, query_text: str, doc_ids: list[str]) -> list[float]:
        """BM25 score of each given doc for the query (0.0 without term overlap).

        Touches only the given docs, never the whole corpus, and sums terms in the
        same order as ``search`` -- the values are identical to ``search``'s.
        """
        rows = self.rows_of(pa.array(list(doc_ids), pa.string()))
        if (rows < 0).any():
            raise KeyError(f"doc id {list(doc_ids)[int(np.flatnonzero(rows < 0)[0])]!r} is not in the index")
        tokens = tokenize([query_text], self.cfg)[0]
        if self._okapi is not None:
            tokens = [t for t in tokens if t in self._okapi.idf]
            if not tokens or len(rows) == 0:
                return [0.0] * len(rows)
            return [float(s) for s in self._okapi.get_batch_scores(tokens, rows.tolist())]

        s = self._retriever.scores
        data, indices, indptr = s["data"], s["indices"], s["indptr"]
        out = np.zeros(len(rows), dtype=np.float64)
        rows = rows.astype(indices.dtype)  # searchsorted would otherwise copy each posting list
        for t in self._retriever.get_tokens_ids(tokens):
            lo, hi = int(indptr[t]), int(indptr[t + 1])
            col = indices[lo:hi]  # sorted doc rows of this term's postings
            at = np.minimum(np.searchsorted(col, rows), hi - lo - 1)
            hit = col[at] == rows
            out[hit] += data[lo + at[hit]]
        return out.tolist()

    @property
    def id_array(self) -> pa.Array:
        """The doc ids in index row order, as an Arrow string array."""
        return self._ids.array

    def rows_of(self, ids: pa.Array) -> np.ndarray:
        """The index row of each doc id (-1 for an id not in the index)."""
        return self._ids.rows(ids)

    # ------------------------------------------------------------------ batched queries

    def prepare(self, query_texts: list[str]) -> list:
        """The queries as `search_rows` and `score_rows` take them: with bm25s each query's
        vocabulary ids in query order (unknown terms dropped, repeats kept: what `search` and
        `score` sum over); with rank_bm25 its known tokens."""
        if self._okapi is not None:
            return [[t for t in q if t in self._okapi.idf] for q in tokenize(query_texts, self.cfg)]
        ids, offsets, vocabulary = tokenize_ids(query_texts, self.cfg)
        # The batch's own (small) vocabulary numbered as the index numbers it (-1: not in it).
        vocab = self._retriever.vocab_dict
        known = np.fromiter((vocab.get(term, -1) for term in vocabulary.to_pylist()), np.int64, len(vocabulary))
        ids = known[ids]
        n = len(offsets) - 1
        keep = ids >= 0
        counts = np.bincount(np.repeat(np.arange(n), np.diff(offsets))[keep], minlength=n)
        return np.split(ids[keep], np.cumsum(counts)[:-1])

    def search_rows(self, token_ids: list[np.ndarray], k: int, n_threads: int = 1) -> tuple[np.ndarray, ...]:
        """`search` for a batch of queries, as flat arrays (query, row, score) ordered by query,
        then score desc, then doc id: each query's top k with score > 0, the same rows and the same
        float64 scores as `search`. Only the postings of the queries' terms are read and summed (a
        sparse accumulation into one reused corpus-length scratch per group, of which only the
        touched entries are read back), except for a query whose postings are a large share of the
        corpus (that one is scored densely, as `search` does). Groups of queries run
        in `n_threads` threads; every group's result is independent of the others, so the output
        is the same for any thread count."""
        if k < 1:
            raise ValueError("k must be >= 1")
        if self._okapi is not None:  # the reference engine: one full scoring pass per query
            parts = [self._top_k(self._okapi.get_scores(t) if t else None, k) for t in token_ids]
            query = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p[0]) for p in parts])
            rows = np.concatenate([p[0] for p in parts] + [np.zeros(0, np.int64)]).astype(np.int64)
            return query, rows, np.concatenate([p[1] for p in parts] + [np.zeros(0)]).astype(np.float64)
        indptr = self._retriever.scores["indptr"]
        flat, offsets = _flat_terms(token_ids)
        # Each query's postings: its terms' posting-list lengths summed (by prefix sums, in one pass).
        summed = np.zeros(len(flat) + 1, dtype=np.int64)
        np.cumsum(indptr[flat + 1] - indptr[flat], out=summed[1:])
        sizes = summed[offsets[1:]] - summed[offsets[:-1]]
        # Groups of about equal postings, at least one per thread, none above the budget.
        budget = min(POSTINGS_BUDGET, max(1, -(-int(sizes.sum()) // max(1, n_threads))))
        groups, start, load = [], 0, 0
        for i, size in enumerate(sizes.tolist()):
            if load and load + size > budget:
                groups.append((start, i))
                start, load = i, 0
            load += size
        groups.append((start, len(token_ids)))

        def run(group: tuple[int, int]) -> tuple[np.ndarray, ...]:
            if USE_NUMBA:
                return self._search_group_compiled(token_ids, flat, offsets, sizes, group[0], group[1], k)
            return self._search_group(token_ids, sizes, group[0], group[1], k)

        if n_threads > 1 and len(groups) > 1:
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                parts = list(pool.map(run, groups))
        else:
            parts = [run(g) for g in groups]
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))

    def _search_group(self, token_ids: list[np.ndarray], sizes: np.ndarray, lo: int, hi: int,
                      k: int) -> tuple[np.ndarray, ...]:
        s = self._retriever.scores
        data, indices, indptr, n_docs = s["data"], s["indices"], s["indptr"], int(s["num_docs"])
        # Scratch of this group (this thread): every document's running sum, and which were touched.
        sums, touched = np.zeros(n_docs), np.zeros(n_docs, dtype=bool)
        parts = []
        for i in range(lo, hi):
            if not len(token_ids[i]):
                continue
            if sizes[i] > n_docs // DENSE_SHARE:  # the whole corpus would be gathered anyway
                rows, scores = self._top_k(self._retriever.get_scores_from_ids(token_ids[i].tolist()), k)
            else:
                rows, scores = self._sparse_top_k(token_ids[i], k, data, indices, indptr, sums, touched)
            parts.append((np.full(len(rows), i, dtype=np.int64), rows.astype(np.int64), scores))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))

    def _search_group_compiled(self, token_ids: list[np.ndarray], flat: np.ndarray, offsets: np.ndarray,
                               sizes: np.ndarray, lo: int, hi: int, k: int) -> tuple[np.ndarray, ...]:
        """`_search_group` with the sparse queries in one numba kernel call (`_sparse_group_top_k`,
        which releases the GIL, so the groups' threads run in parallel); the dense ones as there."""
        s = self._retriever.scores
        data, indices, indptr, n_docs = s["data"], s["indices"], s["indptr"], int(s["num_docs"])
        ids = np.arange(lo, hi, dtype=np.int64)
        size = sizes[lo:hi]
        # No postings, no hits (and no zero-sized selection in the kernel).
        dense = ids[(size > 0) & (size > n_docs // DENSE_SHARE)]
        sparse = ids[(size > 0) & (size <= n_docs // DENSE_SHARE)]
        parts = []
        if len(sparse):
            # A query's postings bound its distinct documents: min(k, postings) slots of output each.
            caps = np.minimum(sizes[sparse], k)
            positive = self._positive_weights(data)
            # This group's scratch: the running sums (zero between queries) and, when some weight is
            # not positive, which documents were touched; the touched documents and their scores.
            sums = np.zeros(n_docs)
            touched = np.zeros(0 if positive else n_docs, dtype=np.bool_)
            found = np.empty(int(sizes[sparse].max()), dtype=indices.dtype)
            sc, ties, tie_ranks = np.empty(len(found)), np.empty_like(found), np.empty(len(found), self._rank.dtype)
            out = (np.empty(int(caps.sum()), np.int64), np.empty(int(caps.sum()), np.int64), np.empty(int(caps.sum())))
            n = _sparse_group_top_k(flat, offsets, sparse, caps, data, indices, indptr, self._rank, positive,
                                    sums, touched, found, sc, ties, tie_ranks, np.empty(2 * int(caps.max())), *out)
            parts.append(tuple(o[:n] for o in out))
        for i in dense.tolist():
            rows, scores = self._top_k(self._retriever.get_scores_from_ids(token_ids[i].tolist()), k)
            parts.append((np.full(len(rows), i, dtype=np.int64), rows.astype(np.int64), scores))
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
        merged = tuple(np.concatenate([p[j] for p in parts]) for j in range(3))
        if len(dense):  # back in query order (each query's own order kept)
            order = np.argsort(merged[0], kind="stable")
            merged = tuple(m[order] for m in merged)
        return merged

    def _sparse_top_k(self, terms: np.ndarray, k: int, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                      sums: np.ndarray, touched: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query's top k from the postings of its terms only, summed term by term into the
        `sums` scratch (zero again on return): a term's postings hold each document once, so each
        document's terms are added in query order from 0.0, the same float64 sums as bm25s's
        np.add.at over a zero vector. The documents are collected as first touched (any order
        serves: the selection orders by score, then doc id)."""
        found = []
        positive = self._positive_weights(data)
        for t in terms.tolist():
            lo, hi = int(indptr[t]), int(indptr[t + 1])
            docs = indices[lo:hi]
            before = sums[docs]
            sums[docs] = before + data[lo:hi]
            if positive:  # a touched document's sum is > 0: the sums say which are new
                found.append(docs[before == 0.0])
            else:
                new = docs[~touched[docs]]
                touched[new] = True
                found.append(new)
        rows = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        scores = sums[rows]
        sums[rows] = 0.0
        if not positive:
            touched[rows] = False
        keep = scores > 0
        return self._select(rows[keep], scores[keep], k)

    def score_rows(self, token_ids: list[np.ndarray], query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """BM25 score of each (query, row) pair: `score` for a whole batch at once, a sparse gather
        over the document-term matrix (a binary search of each pair's document's terms, for all
        pairs together: `_RowTerms`). Terms are added in query order from 0.0, so the values are
        `score`'s."""
        out = np.zeros(len(rows), dtype=np.float64)
        if self._okapi is not None:
            for i in np.unique(query).tolist():
                at = np.flatnonzero(query == i)
                if token_ids[i]:
                    out[at] = self._okapi.get_batch_scores(token_ids[i], np.asarray(rows)[at].tolist())
            return out
        s = self._retriever.scores
        data = s["data"]
        width = max((len(t) for t in token_ids), default=0)
        if width == 0 or len(rows) == 0:
            return out
        if USE_NUMBA:  # the same sums in one compiled pass over the pairs (the numpy code below: ~2x slower)
            rows = np.asarray(rows, dtype=np.int64)
            if rows.min() < 0 or rows.max() >= len(self.doc_ids):  # the kernel does not check bounds
                raise IndexError("score_rows: a row is outside the index")
            flat, offsets = _flat_terms(token_ids)
            by_row = self._by_row()
            # Scratch: each term's first position in the current query (-1: not in it), and the
            # next position of the same term; one weight slot per query position.
            first = np.full(len(s["indptr"]) - 1, -1, dtype=np.int32)
            longest = int(np.diff(offsets).max())
            _score_pairs(flat, offsets, np.asarray(query, dtype=np.int64), rows, by_row.start, by_row.terms,
                         by_row.position, data, first, np.empty(longest, np.int32), np.empty(longest), out)
            return out
        dense = _dense_scores(data, s["indices"], s["indptr"], token_ids, query, len(self.doc_ids))
        if dense is not None:
            return dense[0][dense[1][query], np.asarray(rows, dtype=np.int64)]
        table = np.full((len(token_ids), width), -1, dtype=np.int64)
        for i, t in enumerate(token_ids):
            table[i, : len(t)] = t
        rows = np.asarray(rows, dtype=np.int64)
        terms = table[query]
        pair, column = np.nonzero(terms >= 0)  # every (pair, query term), by pair then term
        hit, weight = self._by_row().weights(data, terms[pair, column], rows[pair])
        # Terms added in query order, from 0.0: `score`'s sums. Entries grouped by term position
        # once (a pair has at most one entry per position), not a pass over all of them per term;
        # a narrow integer type makes the stable sort a radix sort.
        order = np.argsort(column.astype(np.int16) if width < (1 << 15) else column, kind="stable")
        bounds = np.searchsorted(column[order], np.arange(width + 1))
        for j in range(width):
            at = order[bounds[j]:bounds[j + 1]]
            at = at[hit[at]]
            out[pair[at]] += weight[at]
        return out

    def _positive_weights(self, data: np.ndarray) -> bool:
        # Every weight > 0 (the usual case: the idf floor is positive unless most terms are in
        # more than half of the documents): then a summed document is one with a sum > 0.
        if getattr(self, "_all_positive", None) is None:
            self._all_positive = bool(len(data) == 0 or data.min() > 0)
        return self._all_positive

    def _by_row(self) -> "_RowTerms":
        # Built once per index, under a lock: the batch threads of one stage would each build
        # their own (a second ~1 s pass and ~80 MB at a million documents).
        with _BUILD_LOCK:
            if getattr(self, "_row_terms", None) is None:
                s = self._retriever.scores
                self._row_terms = _RowTerms(s["indices"], s["indptr"], int(s["num_docs"]))
        return self._row_terms

    # ------------------------------------------------------------------ internals

    def _okapi_scores(self, tokens: list[str]) -> np.ndarray | None:
        # Unknown terms add exactly 0 in BM25Okapi but cost a full corpus pass each.
        tokens = [t for t in tokens if t in self._okapi.idf]
        return self._okapi.get_scores(tokens) if tokens else None

    def _top_k(self, scores: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of a full score vector, score > 0, with the doc-id tie-break."""
        if scores is None:
            return np.empty(0, dtype=np.int64), np.empty(0)
        # Select among the matching docs only: on a big corpus most scores are 0,
        # and np.argpartition degrades badly on long runs of equal values.
        cand = np.flatnonzero(scores > 0)
        return self._select(cand, scores[cand], k)

    def _select(self, cand: np.ndarray, sc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k of documents `cand` scoring `sc` (> 0): score desc, then doc id."""
        if k < len(cand):
            kth = sc[np.argpartition(sc, len(sc) - k)[len(sc) - k]]
            tie_group = sc >= kth  # the whole tie group at the cut; trimmed to k below
            cand, sc = cand[tie_group], sc[tie_group]
        o = np.lexsort((self._rank[cand], -sc))[:k]  # last key is primary
        return cand[o], sc[o]

    def _search_bm25s(
        self, batch: list[list[str]], k: int, n_threads: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        r = self._retriever

        def one(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
            ids = r.get_tokens_ids(tokens)  # out-of-vocabulary terms score 0: drop them
            # bm25s's sparse-matrix scoring: adds the query terms' precomputed
            # posting columns into one length-N vector (the only per-query buffer).
            return self._top_k(r.get_scores_from_ids(ids) if ids else None, k)

        if n_threads > 1:
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                return list(pool.map(one, batch))
        return [one(q) for q in batch]


class BM25IndexStage(GlobalStage):
    """Build the BM25 index of the corpus once per corpus fingerprint and keep it
    in the work dir, where the candidates stage loads it."""

    name = "bm25_index"
    version = "1"

    def __init__(self, cfg: BM25Config) -> None:
        self.cfg = cfg

    def fingerprint_config(self) -> dict:
        return self.cfg.model_dump()

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict:
        from hardneg.stages.io import read_table

        corpus = read_table(inputs["corpus"], columns=["doc_id", "text"])
        index = BM25Index.build(corpus.column("doc_id").combine_chunks(), corpus.column("text"), self.cfg)
        index.save(out_dir)
        return {"documents": corpus.num_rows, "engine": self.cfg.engine}


# --------------------------------------------------------------------------- compiled kernels
def _flat_terms(token_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The queries' term ids as the kernels read them: one flat array, query i's at
    flat[offsets[i]:offsets[i + 1]]."""
    offsets = np.zeros(len(token_ids) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in token_ids], out=offsets[1:])
    return np.concatenate([np.asarray(t, dtype=np.int64) for t in token_ids] + [np.zeros(0, np.int64)]), offsets


# Plain scalar loops only: numba's np.partition / np.argsort would cost seconds more compile time.


def _njit(f):
    # Cached on disk: compiled once per machine, not per process; nogil: the groups of a batch
    # run in parallel threads. Without numba the function stays plain Python and is never called.
    from hardneg.stages.engines.compiled import njit

    return njit(f) if numba is not None else f


@_njit
def _kth_largest(a, n, k):
    """Reorder a[:n] in place so that a[n-k:n] hold its k largest values (0 < k <= n) and return
    the smallest of those (Hoare's selection; equal values split evenly, so ties cost nothing)."""
    lo, hi, target = 0, n - 1, n - k
    while lo < hi:
        pivot = a[(lo + hi) >> 1]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return a[target]


@_njit
def _worse(s1, r1, s2, r2):
    # `_select`'s order: score desc, then doc-id rank asc (ranks are unique: a total order).
    return s1 < s2 or (s1 == s2 and r1 > r2)


@_njit
def _sift_down(hs, hr, hd, n, i, s, r, d):
    # Place (score s, rank r, doc d) at slot i of the n-entry heap (worst at the root), sift down.
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _worse(hs[c + 1], hr[c + 1], hs[c], hr[c]):
            c += 1
        if not _worse(hs[c], hr[c], s, r):
            break
        hs[i], hr[i], hd[i] = hs[c], hr[c], hd[c]
        i = c
    hs[i], hr[i], hd[i] = s, r, d


@_njit
def _sparse_group_top_k(flat, offsets, queries, caps, data, indices, indptr, rank, positive,
                        sums, touched, found, sc, ties, tie_ranks, best, out_q, out_rows, out_scores):
    """`_sparse_top_k` for each query of `queries` in turn, written to the out arrays (query
    order, then score desc, then rank); returns how many entries were written. The same float64
    sums: each document's term weights added in query term order from 0.0 in the `sums` scratch.
    The selection gives `_select`'s rows: its order is total (ranks are unique), so the top k is
    unique. It goes by threshold: the cap-th largest score, then the documents above it and, of
    those tied at it, the smallest ranks. (A query's scores take few distinct values in large tie
    groups: an online heap of (score, rank) would keep replacing its root.)"""
    n_out = 0
    for j in range(len(queries)):
        q = queries[j]
        m = _accumulate(flat[offsets[q]:offsets[q + 1]], data, indices, indptr, positive, sums, touched, found)
        cap = caps[j]
        n, n_best = _collect(found, m, sums, touched, positive, cap, sc, best)
        if n > cap:
            n = _keep_top(found, sc, n, cap, best, n_best, rank, ties, tie_ranks)
        _sort_into(found, sc, n, rank, tie_ranks, out_rows[n_out:n_out + n], out_scores[n_out:n_out + n])
        out_q[n_out:n_out + n] = q
        n_out += n
    return n_out


@_njit
def _accumulate(terms, data, indices, indptr, positive, sums, touched, found):
    """Add each term's postings into `sums`, in query order; the documents first touched go to
    `found`, whose length is returned."""
    m = 0
    for t in terms:
        for p in range(indptr[t], indptr[t + 1]):
            d = indices[p]
            before = sums[d]
            if positive:  # every weight > 0: a document is new while its sum is 0
                found[m] = d  # branch-free: the loads of many postings stay in flight
                m += before == 0.0
            elif not touched[d]:
                touched[d] = True
                found[m] = d
                m += 1
            sums[d] = before + data[p]
    return m


@_njit
def _collect(found, m, sums, touched, positive, cap, sc, best):
    """The touched documents with a score > 0 compacted into found/sc, the scratch zeroed again
    on the way; returns their count and that of `best`. `best` (2 cap slots) collects the scores
    that may be among the cap largest; when full it keeps the cap largest and `floor` rises to
    the smallest of them."""
    n_best = 0
    floor = 0.0
    n = 0
    for c in range(m):
        d = found[c]
        s = sums[d]
        sums[d] = 0.0
        if not positive:
            touched[d] = False
        if s > 0.0:
            found[n] = d
            sc[n] = s
            n += 1
            if s > floor:
                best[n_best] = s
                n_best += 1
                if n_best == 2 * cap:
                    floor = _kth_largest(best, n_best, cap)
                    for i in range(cap):
                        best[i] = best[cap + i]
                    n_best = cap
    return n, n_best


@_njit
def _keep_top(found, sc, n, cap, best, n_best, rank, ties, tie_ranks):
    """Compact found/sc to the cap best by (score desc, rank asc): everything above the cap-th
    largest score and, of those tied at it, the smallest ranks. Returns cap."""
    kth = _kth_largest(best, n_best, cap)  # the cap-th largest score
    w = 0
    n_ties = 0
    for c in range(n):
        s = sc[c]
        if s > kth:
            found[w] = found[c]
            sc[w] = s
            w += 1
        elif s == kth:
            ties[n_ties] = found[c]
            tie_ranks[n_ties] = rank[found[c]]
            n_ties += 1
    need = cap - w  # 1 <= need <= n_ties
    # The need-th smallest tie rank, on a copy (tie_ranks stays aligned with ties).
    cut = _kth_largest(tie_ranks[:n_ties].copy(), n_ties, n_ties - need + 1)
    for c in range(n_ties):
        if tie_ranks[c] <= cut:
            found[w] = ties[c]
            sc[w] = kth
            w += 1
    return w


@_njit
def _sort_into(found, sc, n, rank, scratch_ranks, hd, hs):
    """Heap sort of found[:n] by (score desc, rank asc) into hd (documents) and hs (scores):
    heapify with the worst at the root, then move the root to the end each time, which leaves
    them best first."""
    hr = scratch_ranks[:n]
    for i in range(n):
        hs[i], hr[i], hd[i] = sc[i], rank[found[i]], found[i]
    for i in range(n // 2 - 1, -1, -1):
        _sift_down(hs, hr, hd, n, i, hs[i], hr[i], hd[i])
    for end in range(n - 1, 0, -1):
        s, r, d = hs[end], hr[end], hd[end]
        hs[end], hr[end], hd[end] = hs[0], hr[0], hd[0]
        _sift_down(hs, hr, hd, end, 0, s, r, d)


@_njit
def _score_pairs(flat, offsets, query, rows, start, row_terms, position, data, first, following, weights, out):
    """score_rows' sums in one pass over the pairs: for each (query, row) pair, the row's terms
    looked up in the query's terms (a term -> query positions map, rebuilt when the query
    changes: pairs grouped by query rebuild it once per query), each query position given the
    row's weight of its term or 0.0, then added in query order from 0.0: the same float64 sums
    as the numpy code (adding 0.0 changes no sum that starts at +0.0). A row's few terms are read
    in one place, where a binary search per query term cost a branch miss per halving."""
    current = -1
    for i in range(len(rows)):
        q, r = query[i], rows[i]
        lo, hi = offsets[q], offsets[q + 1]
        if q != current:
            if current >= 0:
                for a in range(offsets[current], offsets[current + 1]):
                    first[flat[a]] = -1
            for a in range(hi - 1, lo - 1, -1):  # backwards: each term's positions chained in order
                following[a - lo] = first[flat[a]]
                first[flat[a]] = a - lo
            current = q
        for j in range(hi - lo):
            weights[j] = 0.0
        for p in range(start[r], start[r + 1]):
            j = first[row_terms[p]]
            if j >= 0:
                w = data[position[p]]
                while j >= 0:  # a term the query repeats counts at each of its positions
                    weights[j] = w
                    j = following[j]
        acc = 0.0
        for j in range(hi - lo):
            acc += weights[j]
        out[i] = acc


# score_rows on a small corpus: each query's score of every document (queries x documents at most
# this many cells, their terms' postings at most POSTINGS_BUDGET entries), then the pairs gathered.
DENSE_SCORE_CELLS = 4_000_000


def _dense_scores(data, indices, indptr, token_ids, query: np.ndarray, n_docs: int):
    """(scores [asked query, document], slot of each query) when the asked queries' whole-corpus
    scores are small to hold, else None. Each query's terms are added in query order from 0.0
    (bincount sums in input order), as `score` adds them: the same float64 values."""
    wanted = np.unique(query)
    if len(wanted) * n_docs > DENSE_SCORE_CELLS:
        return None
    lists = [np.asarray(token_ids[i], dtype=np.int64) for i in wanted.tolist()]
    terms = np.concatenate(lists)
    lo = indptr[terms].astype(np.int64)
    lengths = indptr[terms + 1].astype(np.int64) - lo
    total = int(lengths.sum())
    if total > POSTINGS_BUDGET:
        return None
    owner = np.repeat(np.arange(len(wanted), dtype=np.int64), [len(t) for t in lists])
    entry = np.repeat(lo - (np.cumsum(lengths) - lengths), lengths) + np.arange(total, dtype=np.int64)
    keys = np.repeat(owner, lengths) * n_docs + indices[entry]
    sums = np.bincount(keys, weights=data[entry], minlength=len(wanted) * n_docs).reshape(len(wanted), n_docs)
    slot = np.full(len(token_ids), -1, dtype=np.int64)
    slot[wanted] = np.arange(len(wanted))
    return sums, slot


class _RowTerms:
    """The document-term matrix by document (CSR) beside bm25s's by term (CSC): each document's
    terms in ascending order and where each sits in the CSC arrays, built once per process (two
    int32 and one int64 per posting: ~80 MB for 1M twelve-word documents). Looking a (term, row)
    pair up is then a binary search of that row's few terms, for all pairs at once, instead of
    one of the term's postings, which grow with the corpus."""

    def __init__(self, indices: np.ndarray, indptr: np.ndarray, n_docs: int) -> None:
        nnz = len(indices)
        small = np.int32 if nnz < (1 << 31) else np.int64
        # Stable: within a document, entries keep CSC order, i.e. ascending term id.
        self.position = np.argsort(indices, kind="stable").astype(small)
        self.terms = np.repeat(np.arange(len(indptr) - 1, dtype=small), np.diff(indptr))[self.position]
        self.start = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum(np.bincount(indices, minlength=n_docs), out=self.start[1:])

    def weights(self, data: np.ndarray, terms: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each (term, row): whether the row contains the term, and its weight there. A lower
        bound of the term in the row's sorted terms, all pairs in step: as many halvings as the
        longest row needs (a pair whose range is empty just stays), no compaction between them."""
        lo = self.start[rows].astype(self.position.dtype)
        end = self.start[rows + 1].astype(self.position.dtype)
        hi = end.copy()
        longest = int((end - lo).max()) if len(rows) else 0
        last = max(len(self.terms) - 1, 0)
        for _ in range(longest.bit_length()):  # ceil(log2(longest + 1)) halvings
            mid = (lo + hi) >> 1
            less = (self.terms[np.minimum(mid, last)] < terms) & (lo < hi)
            lo = np.where(less, mid + 1, lo)
            hi = np.where(less, hi, mid)
        found = lo < end
        found[found] = self.terms[lo[found]] == terms[found]
        weight = np.zeros(len(terms))
        weight[found] = data[self.position[lo[found]]]
        return found, weight


def _first_k_per_group(group: np.ndarray, k: int, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """The first k entries of each run of equal values in the sorted `group`, and the same
    entries of every column."""
    if len(group) == 0:
        return (group, *columns)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    position = np.arange(len(group)) - np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    keep = position < k
    return (group[keep], *(c[keep] for c in columns))


def _id_array(doc_ids) -> pa.Array:
    if isinstance(doc_ids, pa.ChunkedArray):
        return doc_ids.combine_chunks().cast(pa.string())
    if isinstance(doc_ids, pa.Array):
        return doc_ids.cast(pa.string())
    return pa.array(list(doc_ids), pa.string())


class _IdSequence:
    """Read-only list view of an Arrow string array: `ids[i]` is a Python str, made on access."""

    def __init__(self, array: pa.Array) -> None:
        self._array = array

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._array[i].to_pylist()
        return self._array[i].as_py()

    def __iter__(self):
        return iter(self._array.to_pylist())
