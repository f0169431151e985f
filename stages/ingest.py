"""Ingest: read a BEIR folder or a pair file, normalise it into the corpus, queries and pairs
tables, and write every row that cannot be used to rejects with its reason.

Nothing is dropped silently: a malformed line, a row without text, a duplicate id (the first
wins), a judgement that points at a missing document or query — each becomes a reject row.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from hardneg import schemas
from hardneg.stages.base import GlobalStage, InputError
from hardneg.stages.io import ShardWriter

MAX_TEXT_CHARS = 1_000_000  # longer texts are truncated by the models anyway; keep memory sane


def _has_lone_surrogate(value: Any) -> bool:
    """JSON may spell a lone UTF-16 surrogate (`"\\ud800"`): valid JSON, but no UTF-8 text, so no
    Arrow string can hold it. True if any string in `value` (keys included) has one."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def content_id(text: str) -> str:
    """A stable id for a text that came without one."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


_ahead: dict[tuple, Future] = {}


def _stat_key(path: Path) -> tuple:
    # A file changed since its hash was started (another run in this process) is hashed again.
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def fingerprint_ahead(*paths: Path) -> None:
    """Start hashing files a later stage's fingerprint needs, in a daemon thread (sha256
    releases the GIL), while the stages before it run: a million 384-d vectors take ~1.5 s to
    hash, which the run otherwise waited for between ingest and the corpus_vectors stage."""
    todo = []
    for path in paths:
        if Path(path).is_file() and _stat_key(path) not in _ahead:
            _ahead[_stat_key(path)] = future = Future()
            todo.append((path, future))

    def work() -> None:
        for path, future in todo:
            try:
                future.set_result(_file_digest(Path(path)))
            except BaseException as err:  # noqa: BLE001 - handed to the run that asks for it
                future.set_exception(err)

    if todo:
        threading.Thread(target=work, name="hardneg-hash", daemon=True).start()


def file_fingerprint(path: Path) -> str:
    ahead = _ahead.pop(_stat_key(path), None) if Path(path).is_file() else None
    return ahead.result() if ahead is not None else _file_digest(path)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            # The same running digest, fed by readinto into one reused buffer (no bytes object per
            # chunk): a 1.5 GB vectors file hashed in about half the time.
            hashlib.file_digest(handle, lambda: digest)
    return digest.hexdigest()


class Rejects:
    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.counts: dict[str, int] = {}
        self.pair_counts: dict[str, int] = {}
        self._buffer: list[dict] = []

    def add(self, source: str, line: int | None, id_: str | None, reason: str, detail: str = "", pair: bool = False) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if pair:
            self.pair_counts[reason] = self.pair_counts.get(reason, 0) + 1
        self._buffer.append(
            {"stage": "ingest", "source": source, "line": line, "id": id_, "reason": reason, "detail": detail[:500], "pair": pair}
        )
        if len(self._buffer) >= 10_000:
            self.flush()

    def flush(self) -> None:
        self.writer.write_rows(self._buffer)
        self._buffer = []


# Table files by name (a trailing .gz is gzip: BEIR collections are often shipped so). A name
# outside this list is refused, never guessed at: a misread file would look like bad rows.
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
FORMAT_NAMES = ".jsonl, .csv, .tsv (each optionally .gz), .parquet"


def beir_file(folder: Path, name: str) -> Path | None:
    """`name` in a BEIR folder, or its gzipped `name.gz`; None if neither is a file."""
    for candidate in (Path(folder) / name, Path(folder) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def table_format(path: Path) -> str | None:
    """jsonl, csv, tsv, parquet, or datasets (a save_to_disk folder); None if the name says none."""
    path = Path(path)
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return FORMATS.get(Path(name).suffix)


def check_table_format(path: Path, what: str) -> str:
    """The format of a pair or corpus file, or a one-line InputError naming what it is not."""
    fmt = table_format(path)
    if fmt is None:
        raise InputError(f"{what} file {path}: unknown format {''.join(Path(path).suffixes) or '(no suffix)'}: "
                         f"give {FORMAT_NAMES}" + (" or a datasets save_to_disk folder" if what == "pair" else ""))
    if fmt == "datasets" and what != "pair":
        raise InputError(f"{what} file {path} is a folder: give a {FORMAT_NAMES} file")
    if fmt == "parquet" and Path(path).name.lower().endswith(".gz"):
        raise InputError(f"{what} file {path}: Parquet compresses itself: give the .parquet file, not a .gz of it")
    return fmt


def _open_binary(path: Path):
    """The file's bytes, gunzipped when it starts with gzip's magic number (whatever its name)."""
    handle = open(path, "rb")
    if handle.read(2) == b"\x1f\x8b":
        handle.seek(0)
        return gzip.GzipFile(fileobj=handle, mode="rb")
    handle.seek(0)
    return handle


def _damaged(path: Path, err: Exception) -> InputError:
    return InputError(f"{path}: a damaged gzip file ({err.__class__.__name__}: {str(err)[:120]})")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a plain or gzipped text file."""
    with _open_binary(path) as handle:
        try:
            yield from enumerate(handle, start=1)
        except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz
            raise _damaged(path, err) from None


class Judgement(NamedTuple):
    """One line of a BEIR qrels file: its ids and grade, or the problem that kept them out
    ("invalid_utf8", "malformed_qrels_line") with the line's text."""

    number: int
    query_id: str
    doc_id: str
    grade: float
    problem: str | None = None
    text: str = ""


def read_judgements(path: Path) -> Iterator[Judgement]:
    """Every judgement line of a BEIR qrels file (plain or gzipped), header and blank lines left
    out. Ingest rejects the lines with a problem; eval, reading someone's qrels, skips them."""
    for number, raw in _lines(path):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield Judgement(number, "", "", 0.0, "invalid_utf8")
            continue
        if not line.strip():
            continue
        cells = line.split("\t")
        if number == 1 and cells[0] in ("query-id", "query_id", "qid"):
            continue
        try:
            yield Judgement(number, cells[0].strip(), cells[1].strip(), float(cells[2]))
        except (IndexError, ValueError):
            yield Judgement(number, "", "", 0.0, "malformed_qrels_line", line[:200])


def _iter_csv(path: Path, rejects: Rejects, delimiter: str, pair: bool = False) -> Iterator[tuple[int, dict, list[str]]]:
    """Rows of a CSV/TSV file with a header line, as {column: text}. A row with another number
    of cells than the header, or with bytes that are not UTF-8, is a reject."""
    csv.field_size_limit(1 << 30)  # texts may be long; the default limit is 128 KiB
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        header: list[str] | None = None
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                rejects.add(path.name, reader.line_num, None, "malformed_csv_row", str(err), pair=pair)
                continue
            except (OSError, EOFError, zlib.error) as err:
                raise _damaged(path, err) from None
            if not any(cell.strip() for cell in cells):
                continue
            if _has_lone_surrogate(cells):
                if header is None:
                    raise InputError(f"{path}: its header line is not UTF-8")
                rejects.add(path.name, reader.line_num, None, "invalid_utf8", pair=pair)
            elif header is None:
                header = [cell.strip() for cell in cells]
            elif len(cells) != len(header):
                rejects.add(path.name, reader.line_num, None, "malformed_csv_row",
                            f"{len(cells)} cells, the header has {len(header)}", pair=pair)
            else:
                yield reader.line_num, dict(zip(header, cells)), header


def _iter_jsonl(path: Path, rejects: Rejects, pair: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each valid JSON object line; reject the rest (as pairs
    when the file is a pair file, so the pair accounting stays exact). Gzipped files too."""
    for number, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            # A byte order mark may open the file; nowhere else is it valid.
            obj = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            rejects.add(path.name, number, None, "invalid_utf8", pair=pair)
            continue
        except json.JSONDecodeError as err:
            rejects.add(path.name, number, None, "invalid_json", str(err), pair=pair)
            continue
        if not isinstance(obj, dict):
            rejects.add(path.name, number, None, "not_an_object", pair=pair)
            continue
        # A lone surrogate can only come from a \\uD800-\\uDFFF escape (the bytes decoded as strict
        # UTF-8): lines without one skip the walk over every string of the object.
        if (b"\\ud" in raw or b"\\uD" in raw) and _has_lone_surrogate(obj):
            rejects.add(path.name, number, None, "invalid_unicode", "a lone surrogate escape (\\udXXX)", pair=pair)
            continue
        yield number, obj


def _as_id(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, str)):
        text = str(value).strip()
        return text or None
    return None


def _as_text(*parts: Any) -> str | None:
    """Join the string parts; None if any part has the wrong type or the result is blank."""
    pieces = []
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, str):
            return None
        pieces.append(part.strip())
    text = " ".join(p for p in pieces if p)
    return text[:MAX_TEXT_CHARS] if text else None


@dataclass
class _Collected:
    corpus_ids: set[str] = field(default_factory=set)
    text_to_doc: dict[str, str] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)
    # doc id -> content ids its text may come as (with or without its title); kept only when
    # positives carry ids, to find a positive whose text contradicts its id.
    doc_texts: dict[str, set[str]] | None = None


@dataclass(frozen=True)
class IngestConfig:
    """What ingest reads of a run's config (`MineConfig.ingest_config()`); validated there."""

    beir: Path | None = None
    pairs: Path | None = None
    corpus: Path | None = None
    split: str = "test"
    positives: str = "all"
    hide_extra_positives: bool = False
    query_column: str | None = None
    positive_column: str | None = None
    query_id_column: str | None = None
    positive_id_column: str | None = None
    corpus_id_column: str = "_id"
    corpus_text_column: str = "text"

    @classmethod
    def of(cls, config) -> "IngestConfig":
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


class IngestStage(GlobalStage):
    name = "ingest"
    version = "1"

    def __init__(self, config: IngestConfig) -> None:
        # A whole MineConfig is accepted too (scripts and tests): ingest keeps only its part.
        self.config = config if isinstance(config, IngestConfig) else IngestConfig.of(config)

    def part_fingerprint(self, part: str) -> str | None:
        """The corpus table has a narrower identity than the whole ingest (see below)."""
        return self.corpus_fingerprint() if part == "corpus" else None

    def _input_hashes(self) -> dict[str, str]:
        if not hasattr(self, "_hashes"):
            c = self.config
            self._hashes = {}
            if c.beir is not None:
                # Only the files this split reads, so other splits' qrels do not matter.
                for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{c.split}.tsv"):
                    path = beir_file(Path(c.beir), name)
                    # A gzipped file is hashed as stored: its fingerprint differs from the plain one.
                    self._hashes[name] = file_fingerprint(path) if path is not None else "missing"
            for key in ("pairs", "corpus"):
                path = getattr(c, key)
                if path is not None:
                    self._hashes[key] = file_fingerprint(Path(path))
        return self._hashes

    def corpus_fingerprint(self) -> str:
        """What the corpus table depends on: corpus embeddings and indices chain this, not the
        whole ingest, so changing `positives` or the qrels split re-embeds nothing."""
        import hashlib
        import json

        hashes = self._input_hashes()
        c = self.config
        if c.beir is not None:
            basis = {"corpus.jsonl": hashes["corpus.jsonl"]}
        else:
            basis = {**hashes, "columns": [c.positive_column, c.positive_id_column, c.corpus_id_column, c.corpus_text_column, c.query_column]}
        payload = json.dumps({"stage": "corpus", "version": self.version, "basis": basis, "schema": schemas.SCHEMA_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def fingerprint_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "inputs": self._input_hashes(),
            "split": c.split if c.beir else None,
            "positives": c.positives,
            "hide_extra_positives": c.hide_extra_positives,
            "columns": [c.query_column, c.positive_column, c.query_id_column, c.positive_id_column, c.corpus_id_column, c.corpus_text_column],
            "schema": schemas.SCHEMA_VERSION,
        }

    def run(self, inputs: dict[str, Path], out_dir: Path) -> dict[str, Any]:
        rejects = Rejects(ShardWriter(out_dir / "rejects", schemas.REJECTS))
        with ShardWriter(out_dir / "corpus", schemas.CORPUS) as corpus:
            if self.config.beir is not None:
                pairs, masks, queries, seen = self._read_beir(Path(self.config.beir), corpus, rejects)
            else:
                pairs, masks, queries, seen = self._read_pair_file(corpus, rejects)
        info = self._write_pairs(out_dir, pairs, masks, queries)
        rejects.flush()
        rejects.writer.close()
        info.update(
            corpus_rows=len(seen.corpus_ids),
            rejects=rejects.counts,
            rejected_pairs=rejects.pair_counts,
        )
        return info

    # ---------------------------------------------------------------- BEIR
    def _read_corpus_jsonl(self, path: Path, corpus: ShardWriter, rejects: Rejects, id_key: str = "_id", text_key: str = "text",
                           rows: Iterator[tuple[int, dict]] | None = None, seen: _Collected | None = None) -> _Collected:
        """The corpus from JSON objects (`rows`: the same from another format, e.g. CSV)."""
        # Content ids of corpus texts are looked up only by pair files' positives (a BEIR corpus,
        # read with no `seen` yet, never needs them: a sha1 per document saved).
        hash_texts = seen is not None
        seen = seen or _Collected()
        ids: list[str] = []
        texts: list[str] = []
        for line, obj in rows if rows is not None else _iter_jsonl(path, rejects):
            doc_id = _as_id(obj.get(id_key))
            if doc_id is None:
                rejects.add(path.name, line, None, "missing_id")
                continue
            text = _as_text(obj.get("title"), obj.get(text_key)) if id_key == "_id" else _as_text(obj.get(text_key))
            if text is None:
                wrong = _wrong_type(obj, text_key) or (id_key == "_id" and _wrong_type(obj, "title"))
                rejects.add(path.name, line, doc_id, "wrong_type" if wrong else "empty_text")
                continue
            if doc_id in seen.corpus_ids:
                rejects.add(path.name, line, doc_id, "duplicate_id", "the first occurrence wins")
                continue
            seen.corpus_ids.add(doc_id)
            if hash_texts:
                seen.text_to_doc.setdefault(content_id(text), doc_id)
            if seen.doc_texts is not None:  # a positive of this id may come with the text alone
                seen.doc_texts[doc_id] = {content_id(text), content_id(_as_text(obj.get(text_key)) or text)}
            ids.append(doc_id)
            texts.append(text)
            if len(ids) >= 50_000:
                _write_corpus(corpus, ids, texts)
                ids, texts = [], []
        _write_corpus(corpus, ids, texts)
        return seen

    def _read_beir(self, folder: Path, corpus: ShardWriter, rejects: Rejects):
        seen = self._read_corpus_jsonl(_beir_path(folder, "corpus.jsonl"), corpus, rejects)
        self._read_queries(_beir_path(folder, "queries.jsonl"), seen, rejects)
        return self._read_judgements(folder, seen, rejects)

    def _read_queries(self, queries_path: Path, seen: _Collected, rejects: Rejects) -> None:
        for line, obj in _iter_jsonl(queries_path, rejects):
            query_id = _as_id(obj.get("_id"))
            text = _as_text(obj.get("text"))
            if query_id is None:
                rejects.add(queries_path.name, line, None, "missing_id")
            elif text is None:
                rejects.add(queries_path.name, line, query_id, "empty_text")
            elif query_id in seen.queries:
                rejects.add(queries_path.name, line, query_id, "duplicate_id", "the first occurrence wins")
            else:
                seen.queries[query_id] = text

    def _read_judgements(self, folder: Path, seen: _Collected, rejects: Rejects):
        qrels_name = f"qrels/{self.config.split}.tsv"
        # With positives=all every positive judgement is an input pair; with positives=best each
        # judged query is one, so a bad judgement line is a pair only in the first case.
        per_judgement = self.config.positives == "all"
        judged_queries: dict[str, int] = {}
        judged: dict[str, list[tuple[str, float, int]]] = {}
        for number, query_id, doc_id, grade, problem, text in read_judgements(_beir_path(folder, qrels_name)):
            if problem:
                rejects.add(qrels_name, number, None, problem, text, pair=per_judgement)
                continue
            if grade <= 0:
                continue  # a judgement of non-relevance, not a pair
            pair_id = f"{query_id}:{doc_id}"
            judged_queries.setdefault(query_id, number)
            if query_id not in seen.queries:
                rejects.add(qrels_name, number, pair_id, "unknown_query", pair=per_judgement)
            elif doc_id not in seen.corpus_ids:
                rejects.add(qrels_name, number, pair_id, "unknown_document", pair=per_judgement)
            elif any(d == doc_id for d, _, _ in judged.get(query_id, ())):
                rejects.add(qrels_name, number, pair_id, "duplicate_judgement", pair=per_judgement)
            else:
                judged.setdefault(query_id, []).append((doc_id, grade, number))

        if not per_judgement:
            for query_id, number in judged_queries.items():
                if query_id not in judged:
                    rejects.add(qrels_name, number, query_id, "no_usable_judgement", "every judgement of this query was rejected", pair=True)
        pairs: list[tuple[str, str]] = []
        masks: dict[str, list[str]] = {}
        for query_id, docs in judged.items():
            if self.config.positives == "best":
                # Highest grade; ties go to the lowest id (numerically when ids are numbers).
                best = min(docs, key=lambda d: (-d[1], _id_order(d[0])))
                chosen = [best[0]]
            else:
                chosen = [d for d, _, _ in docs]
            pairs.extend((query_id, doc_id) for doc_id in chosen)
            masks[query_id] = chosen if self.config.hide_extra_positives else [d for d, _, _ in docs]
        return pairs, masks, seen.queries, seen

    # ---------------------------------------------------------------- pair files
    def _read_pair_file(self, corpus: ShardWriter, rejects: Rejects):
        c = self.config
        seen = _Collected(doc_texts={} if c.positive_id_column else None)
        if c.corpus is not None:
            seen = self._read_corpus_file(Path(c.corpus), corpus, rejects, seen)
        pairs: list[tuple[str, str]] = []
        new_docs: list[dict] = []
        source = Path(c.pairs).name
        for line, row, columns in _iter_pair_rows(Path(c.pairs), rejects):
            q_col = c.query_column or (columns[0] if columns else None)
            p_col = c.positive_column or (columns[1] if len(columns) > 1 else None)
            if q_col is None or p_col is None:
                rejects.add(source, line, None, "missing_columns", "a pair needs a query and a positive column", pair=True)
                continue
            query, positive = row.get(q_col), row.get(p_col)
            if q_col not in row or p_col not in row:
                rejects.add(source, line, None, "missing_field", f"needs {q_col!r} and {p_col!r}", pair=True)
                continue
            if not isinstance(query, str) or not isinstance(positive, str):
                rejects.add(source, line, None, "wrong_type", "query and positive must be strings", pair=True)
                continue
            query, positive = _as_text(query), _as_text(positive)
            if query is None or positive is None:
                rejects.add(source, line, None, "empty_text", pair=True)
                continue
            query_id = _as_id(row.get(c.query_id_column)) if c.query_id_column else content_id(query)
            if query_id is None:
                rejects.add(source, line, None, "missing_id", c.query_id_column or "", pair=True)
                continue
            known = seen.queries.get(query_id)
            if known is not None and known != query:
                rejects.add(source, line, query_id, "conflicting_query_text", "the first text of this id wins", pair=True)
                continue
            seen.queries.setdefault(query_id, query)
            if c.positive_id_column:
                doc_id = _as_id(row.get(c.positive_id_column))
                if doc_id is None:
                    rejects.add(source, line, None, "missing_id", c.positive_id_column, pair=True)
                    continue
            else:
                # The same text in the corpus is the same document: it must be masked, not mined.
                doc_id = seen.text_to_doc.get(content_id(positive)) or content_id(positive)
            if seen.doc_texts is not None and doc_id in seen.doc_texts and content_id(positive) not in seen.doc_texts[doc_id]:
                rejects.add(source, line, doc_id, "conflicting_positive_text", "the first text of this id wins", pair=True)
                continue
            if doc_id not in seen.corpus_ids:
                seen.corpus_ids.add(doc_id)
                seen.text_to_doc.setdefault(content_id(positive), doc_id)
                if seen.doc_texts is not None:
                    seen.doc_texts[doc_id] = {content_id(positive)}
                new_docs.append({"doc_id": doc_id, "text": positive})
            pairs.append((query_id, doc_id))
        corpus.write_rows(new_docs)
        deduped, masks = _dedupe_pairs(pairs, source, rejects)
        return deduped, masks, seen.queries, seen

    def _read_corpus_file(self, path: Path, corpus: ShardWriter, rejects: Rejects, seen: _Collected) -> _Collected:
        """The --corpus file of a pair file, in any table format. A corpus of which no document
        could be read is an error: mining from the positives alone is not what was asked for."""
        c = self.config
        fmt = check_table_format(path, "corpus")
        if fmt == "parquet":
            seen = self._read_corpus_table(_read_parquet(path, "corpus"), path.name, corpus, rejects, seen)
        else:
            rows = None if fmt == "jsonl" else ((n, row) for n, row, _ in _iter_csv(path, rejects, "," if fmt == "csv" else "\t"))
            seen = self._read_corpus_jsonl(path, corpus, rejects, c.corpus_id_column, c.corpus_text_column, rows=rows, seen=seen)
        if not seen.corpus_ids:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(rejects.counts.items())) or "no rows"
            raise InputError(f"corpus file {path}: no document could be read as {fmt} "
                             f"(columns {c.corpus_id_column!r}, {c.corpus_text_column!r}; rejects: {reasons})")
        return seen

    def _read_corpus_table(self, table: pa.Table, name: str, corpus: ShardWriter, rejects: Rejects,
                           seen: _Collected | None = None) -> _Collected:
        c = self.config
        seen = seen or _Collected()
        if c.corpus_id_column not in table.column_names or c.corpus_text_column not in table.column_names:
            raise InputError(f"corpus {name}: needs columns {c.corpus_id_column!r} and {c.corpus_text_column!r}")
        rows = []
        for number, (raw_id, raw_text) in enumerate(
            zip(table.column(c.corpus_id_column).to_pylist(), table.column(c.corpus_text_column).to_pylist()), start=1
        ):
            doc_id, text = _as_id(raw_id), _as_text(raw_text) if isinstance(raw_text, str) else None
            if doc_id is None or text is None:
                rejects.add(name, number, doc_id, "missing_id" if doc_id is None else "empty_text")
            elif doc_id in seen.corpus_ids:
                rejects.add(name, number, doc_id, "duplicate_id", "the first occurrence wins")
            else:
                seen.corpus_ids.add(doc_id)
                seen.text_to_doc.setdefault(content_id(text), doc_id)
                if seen.doc_texts is not None:
                    seen.doc_texts[doc_id] = {content_id(text)}
                rows.append({"doc_id": doc_id, "text": text})
        corpus.write_rows(rows)
        return seen

    # ---------------------------------------------------------------- outputs
    def _write_pairs(self, out_dir: Path, pairs, masks, queries) -> dict[str, Any]:
        grouped: dict[str, list[tuple[str, int]]] = {}
        with ShardWriter(out_dir / "pairs", schemas.PAIRS) as writer:
            rows = []
            for order, (query_id, doc_id) in enumerate(pairs):
                pair_id = f"{query_id}:{doc_id}"
                rows.append({"pair_id": pair_id, "pair_order": order, "query_id": query_id, "positive_id": doc_id})
                grouped.setdefault(query_id, []).append((doc_id, order))
            writer.write_rows(rows)
        with ShardWriter(out_dir / "queries", schemas.QUERIES) as writer:
            writer.write_rows(
                [
                    {
                        "query_id": query_id,
                        "text": queries[query_id],
                        "pair_ids": [f"{query_id}:{d}" for d, _ in items],
                        "pair_order": [o for _, o in items],
                        "positive_ids": [d for d, _ in items],
                        "mask_ids": sorted(set(masks[query_id]) | {d for d, _ in items}),
                    }
                    for query_id, items in grouped.items()
                ]
            )
        return {"pairs": len(pairs), "queries": len(grouped)}


def _write_corpus(corpus: ShardWriter, ids: list[str], texts: list[str]) -> None:
    # Two columns built directly: the same table as write_rows' dicts, without a dict per row.
    if ids:
        corpus.write(pa.table({"doc_id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}, schema=schemas.CORPUS))


def _dedupe_pairs(pairs: list[tuple[str, str]], source: str, rejects: Rejects):
    """The pairs without repeats (rejected as duplicate_pair), and each query's positives."""
    masks: dict[str, list[str]] = {}
    deduped: list[tuple[str, str]] = []
    seen_pairs: set[tuple[str, str]] = set()
    for query_id, doc_id in pairs:
        if (query_id, doc_id) in seen_pairs:
            rejects.add(source, None, f"{query_id}:{doc_id}", "duplicate_pair", pair=True)
            continue
        seen_pairs.add((query_id, doc_id))
        deduped.append((query_id, doc_id))
        masks.setdefault(query_id, []).append(doc_id)
    return deduped, masks


def _beir_path(folder: Path, name: str) -> Path:
    path = beir_file(folder, name)
    if path is None:
        raise InputError(f"BEIR folder {folder}: missing {name}")
    return path


def _read_parquet(path: Path, what: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, UnicodeDecodeError) as err:
        raise InputError(f"{what} file {path}: not a readable Parquet file ({err.__class__.__name__}: {str(err)[:200]})") from None


def _wrong_type(obj: dict, key: str) -> bool:
    value = obj.get(key)
    return value is not None and not isinstance(value, str)


def _id_order(doc_id: str) -> tuple:
    return (0, int(doc_id), doc_id) if doc_id.isdigit() else (1, 0, doc_id)


def _iter_pair_rows(path: Path, rejects: Rejects) -> Iterator[tuple[int | None, dict, list[str]]]:
    """Rows of a JSONL, CSV/TSV (each maybe gzipped), Parquet or datasets save_to_disk pair
    file, with the column order."""
    fmt = check_table_format(path, "pair")
    if fmt in ("csv", "tsv"):
        yield from _iter_csv(path, rejects, "," if fmt == "csv" else "\t", pair=True)
    elif fmt == "datasets":
        import datasets

        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable folder is a user error
            raise InputError(f"pair folder {path}: not a datasets save_to_disk folder ({err.__class__.__name__})") from None
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[next(iter(dataset))]
        columns = list(dataset.column_names)
        for number, row in enumerate(dataset.iter(batch_size=1), start=1):
            yield number, {k: v[0] for k, v in row.items()}, columns
    elif fmt == "parquet":
        try:
            parquet = pq.ParquetFile(path)
            columns = parquet.schema_arrow.names
            batches = parquet.iter_batches(batch_size=10_000)
            number = 0
            for batch in batches:
                rows = batch.to_pylist()
                for row in rows:
                    number += 1
                    yield number, row, columns
        except (pa.ArrowException, UnicodeDecodeError) as err:
            raise InputError(f"pair file {path}: not a readable Parquet file ({err.__class__.__name__}: {str(err)[:200]})") from None
    else:
        columns: list[str] = []
        for number, obj in _iter_jsonl(path, rejects, pair=True):
            if not columns:
                columns = list(obj.keys())
            yield number, obj, columns
