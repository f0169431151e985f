"""Guarantee 4, hostile input: whatever a corpus, query file, qrels or pair file holds —
invalid JSON, wrong types, missing fields, empty or whitespace-only texts, 1 MB texts, invalid
UTF-8, lone surrogates, duplicate ids, judgements of missing documents or queries, unknown
columns — a run never ends in a traceback, and every input pair is accounted for:
input pairs = output pairs + rejected pairs (by reason). Fatal problems (no input, an empty
corpus, an unloadable model, an unwritable output, a full disk) are one line on stderr, exit
code 2, and no partial output.

Property tests (hypothesis) generate the files line by line, each line with a known fate, so the
expected counts are computed independently of the code under test: the ingest stage is checked
directly (fast, many examples) and the whole command line in-process with a tiny random model
(every example runs every stage).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from hardneg import schemas
from hardneg.pipeline.config import MineConfig
from resilience import Run, cli_in_process, env, leftovers, tiny_model
from hardneg.stages.base import InputError
from hardneg.stages.ingest import IngestStage
from hardneg.stages.io import read_table

WORDS = ("flow", "boundary", "layer", "shock", "wave", "heat", "transfer", "wing", "supersonic", "pressure",
         "jet", "plate", "laminar", "turbulent", "mach", "number", "viscous", "slender", "body", "cone")
IDS = ("1", "2", "3", "4", "5", "6", "../../evil", "d/7", "ü8", " 9 ", "10")  # " 9 " is "9" after strip
MB_TEXT = ("pressure " * 120_000)[:1_000_000]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True, print_blob=True)

texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
blank = st.sampled_from(["", " ", "\t\n ", "\u3000", "\r\n"])
# Unicode that is valid (accents, CJK, emoji, NUL, RTL) must survive as text.
odd_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).filter(lambda t: t.strip())


def _norm_id(value) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, str)):
        return str(value).strip() or None
    return None


# A line is (bytes, fate): fate is ("doc", id) for a line that must become a row, ("reject",)
# for one that must be rejected, ("blank",) for an empty line (ignored, not a row at all).
def _doc_line(id_key: str, text_key: str, with_title: bool):
    good_id = st.sampled_from(IDS) | st.integers(1, 6)
    unknown = st.dictionaries(st.sampled_from(["lang", "url", "meta", "score"]), st.integers() | st.text(max_size=5), max_size=2)

    def valid(draw_id, text, title, extra, big):
        obj = {**extra, id_key: draw_id, text_key: MB_TEXT if big else text}
        if with_title and title is not None:
            obj["title"] = title
        return json.dumps(obj).encode(), ("doc", _norm_id(draw_id))

    valid_line = st.builds(valid, good_id, texts | odd_text, st.none() | texts, unknown,
                           st.integers(0, 15).map(lambda i: i == 0))
    rejects = st.one_of(
        st.builds(lambda i, t: json.dumps({id_key: i, text_key: t}).encode(), good_id, blank),             # empty text
        st.builds(lambda i, t: json.dumps({id_key: i, text_key: t}).encode(), good_id,
                  st.sampled_from([5, 1.5, ["a"], {"a": 1}, True])),                                          # text of a wrong type
        st.builds(lambda i, t: json.dumps({id_key: i, text_key: t}).encode(),
                  st.sampled_from([1.5, True, None, ["1"], {"id": 1}, "", "  "]), texts),                   # id of a wrong type / blank
        st.builds(lambda t: json.dumps({text_key: t}).encode(), texts),                                    # no id
        st.builds(lambda i: json.dumps({id_key: i}).encode(), good_id),                                    # no text
        st.sampled_from([b'{"_id": "1", "text": ', b"not json", b"{'_id': '1'}", b'{"_id": "1"} trailing']),  # invalid JSON
        st.sampled_from([b"[1, 2]", b'"text"', b"null", b"42"]),                                            # not an object
        st.builds(lambda i: b'{"%s": "%s", "%s": "caf\xe9 \xff\xfe"}' % (id_key.encode(), i.encode(), text_key.encode()),
                  st.sampled_from(["1", "2"])),                                                             # invalid UTF-8
        st.builds(lambda i: ('{"%s": "%s", "%s": "lone \\ud800 surrogate"}' % (id_key, i, text_key)).encode(),
                  st.sampled_from(["1", "2"])),                                                             # lone surrogate
        st.builds(lambda t: json.dumps({id_key: "\\ud800", text_key: t}).encode().replace(b"\\\\ud800", b"\\ud800"), texts),
    ).map(lambda b: (b, ("reject",)))
    blank_line = st.sampled_from([b"", b"   "]).map(lambda b: (b, ("blank",)))
    return st.one_of(valid_line, valid_line, valid_line, rejects, rejects, blank_line)


def _with_base(hostile, base: list[tuple]):
    """`base` (well-formed lines) shuffled in among the hostile ones, or the hostile ones alone."""
    mixed = hostile.flatmap(lambda extra: st.permutations(base + extra))
    return st.one_of(mixed, mixed, mixed, hostile)


BASE_CORPUS = [(json.dumps({"_id": str(i), "title": WORDS[i], "text": f"{WORDS[i + 1]} {WORDS[i + 2]}"}).encode(), ("doc", str(i)))
               for i in range(1, 7)]
BASE_QUERIES = [(json.dumps({"_id": str(i), "text": f"{WORDS[i + 3]} wing"}).encode(), ("doc", str(i))) for i in range(1, 4)]
corpus_lines = _with_base(st.lists(_doc_line("_id", "text", True), max_size=10), BASE_CORPUS)
query_lines = _with_base(st.lists(_doc_line("_id", "text", False), max_size=6), BASE_QUERIES)
GRADES = ["1", "2", "0", "-1", "x", "1.5", ""]


@st.composite
def qrels_lines(draw):
    """(raw line, kind, query id, doc id, grade string)."""
    lines = []
    if draw(st.booleans()):
        lines.append((b"query-id\tcorpus-id\tscore", "header", None, None, None))
    if draw(st.sampled_from([True, True, True, False])):  # usually a few well-formed judgements among the rest
        lines += [(f"{q}\t{d}\t1".encode(), "judgement", q, d, "1") for q, d in (("1", "2"), ("1", "3"), ("2", "4"), ("3", "6"))]
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["judgement"] * 6 + ["malformed", "invalid_utf8", "blank"]))
        if kind == "judgement":
            # Mostly ids that exist, graded relevant: most examples keep some pairs.
            q = draw(st.sampled_from(IDS[:3] * 3 + IDS + ("missing-q",)))
            d = draw(st.sampled_from(IDS[:6] * 2 + IDS + ("missing-d",)))
            g = draw(st.sampled_from(["1"] * 4 + GRADES))
            lines.append((f"{q}\t{d}\t{g}".encode(), kind, q.strip(), d.strip(), g))
        elif kind == "malformed":
            lines.append((draw(st.sampled_from([b"1\t2", b"just words", b"1 2 1", b"a\tb\tc\td"])), kind, None, None, None))
        elif kind == "invalid_utf8":
            lines.append((b"1\t\xff\xfe\t1", kind, None, None, None))
        else:
            lines.append((b"", kind, None, None, None))
    head, body = lines[:1], lines[1:]
    if head and head[0][1] != "header":
        head, body = [], lines
    return head + draw(st.permutations(body))


def _grade(g: str) -> float | None:
    try:
        return float(g)
    except ValueError:
        return None


def expected_pairs(qrels: list[tuple], positives: str) -> int:
    """The input pairs a qrels file holds, from how each line was made: with positives=all every
    line that judges a document relevant or cannot be read; with best, each query judged relevant."""
    if positives == "all":
        n = 0
        for raw, kind, q, d, g in qrels:
            if kind in ("header", "blank"):
                continue
            if kind == "judgement" and _grade(g) is not None and _grade(g) <= 0:
                continue
            n += 1
        return n
    return len({q for raw, kind, q, d, g in qrels if kind == "judgement" and _grade(g) is not None and _grade(g) > 0})


def expected_rows(lines: list[tuple]) -> set[str]:
    ids: set[str] = set()
    for raw, fate in lines:
        if fate[0] == "doc":
            ids.add(fate[1])
    return ids


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def make_beir(folder: Path, corpus, queries, qrels) -> Path:
    write_lines(folder / "corpus.jsonl", [b for b, _ in corpus])
    write_lines(folder / "queries.jsonl", [b for b, _ in queries])
    write_lines(folder / "qrels" / "test.tsv", [raw for raw, *_ in qrels])
    return folder


def _fresh(tmp_path: Path) -> Path:
    folder = tmp_path / uuid.uuid4().hex[:10]
    folder.mkdir()
    return folder


def run_ingest(config: MineConfig, out: Path) -> dict:
    return IngestStage(config).run({}, out)


def check_tables(out: Path) -> None:
    corpus = read_table(out / "corpus", schemas.CORPUS)
    pairs = read_table(out / "pairs", schemas.PAIRS)
    queries = read_table(out / "queries", schemas.QUERIES)
    rejects = read_table(out / "rejects", schemas.REJECTS)
    doc_ids = corpus.column("doc_id").to_pylist()
    assert len(doc_ids) == len(set(doc_ids)), "duplicate document ids in the corpus table"
    assert all(t and t.strip() for t in corpus.column("text").to_pylist())
    assert set(pairs.column("positive_id").to_pylist()) <= set(doc_ids)
    assert set(pairs.column("query_id").to_pylist()) == set(queries.column("query_id").to_pylist())
    assert len(set(pairs.column("pair_id").to_pylist())) == pairs.num_rows
    assert all(r for r in rejects.column("reason").to_pylist())


# ---------------------------------------------------------------------------- ingest, directly
@settings(max_examples=120, **SETTINGS)
@given(corpus=corpus_lines, queries=query_lines, qrels=qrels_lines(), positives=st.sampled_from(["all", "best"]))
def test_ingest_of_a_hostile_beir_folder_accounts_for_every_pair_and_line(tmp_path, corpus, queries, qrels, positives):
    root = _fresh(tmp_path)
    beir = make_beir(root / "beir", corpus, queries, qrels)
    info = run_ingest(MineConfig(beir=beir, out=root / "out", positives=positives), root / "stage")
    check_tables(root / "stage")
    assert info["pairs"] + sum(info["rejected_pairs"].values()) == expected_pairs(qrels, positives)
    # Every non-blank corpus line is a document or a reject; the first of an id wins.
    rejects = read_table(root / "stage" / "rejects", schemas.REJECTS).to_pylist()
    assert info["corpus_rows"] == len(expected_rows(corpus))
    corpus_rejects = sum(1 for r in rejects if r["source"] == "corpus.jsonl")
    assert info["corpus_rows"] + corpus_rejects == sum(1 for _, fate in corpus if fate[0] != "blank")
    query_rejects = sum(1 for r in rejects if r["source"] == "queries.jsonl")
    assert len(expected_rows(queries)) + query_rejects == sum(1 for _, fate in queries if fate[0] != "blank")


pair_values = texts | odd_text | blank | st.sampled_from([5, None, ["q"], {"t": "x"}, True])


@st.composite
def pair_lines(draw):
    """JSONL pair-file lines: objects with query/positive fields of any type (some missing, some
    with unknown columns), broken lines and blank lines; each non-blank line is one input pair."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["object"] * 6 + ["invalid_json", "invalid_utf8", "surrogate", "not_object", "blank", "duplicate"]))
        if kind == "object":
            obj = {}
            if draw(st.integers(0, 9)):
                obj["query"] = draw(pair_values)
            if draw(st.integers(0, 9)):
                obj["positive"] = MB_TEXT if draw(st.integers(0, 20)) == 0 else draw(pair_values)
            obj.update(draw(st.dictionaries(st.sampled_from(["id", "neg", "source"]), st.integers() | texts, max_size=2)))
            lines.append(json.dumps(obj).encode())
        elif kind == "duplicate" and lines:
            lines.append(lines[-1])
        elif kind == "invalid_json":
            lines.append(b'{"query": "a", ')
        elif kind == "invalid_utf8":
            lines.append(b'{"query": "\xff", "positive": "b"}')
        elif kind == "surrogate":
            lines.append(b'{"query": "\\udc80 lone", "positive": "b"}')
        elif kind == "not_object":
            lines.append(b'["query", "positive"]')
        else:
            lines.append(b"")
    if draw(st.sampled_from([True, True, True, False])):  # usually a few well-formed pairs among the rest
        lines += [json.dumps({"query": f"{WORDS[i]} wing", "positive": f"{WORDS[i + 1]} {WORDS[i + 2]} flow"}).encode()
                  for i in range(4)]
    return draw(st.permutations(lines))


@settings(max_examples=120, **SETTINGS)
@given(lines=pair_lines(), explicit=st.booleans(), with_corpus=st.booleans(), corpus=corpus_lines)
def test_ingest_of_a_hostile_pair_file_accounts_for_every_pair(tmp_path, lines, explicit, with_corpus, corpus):
    root = _fresh(tmp_path)
    pairs = write_lines(root / "pairs.jsonl", lines)
    keys = dict(query_column="query", positive_column="positive") if explicit else {}
    if with_corpus:
        keys["corpus"] = write_lines(root / "corpus.jsonl", [b for b, _ in corpus])
        if not expected_rows(corpus):  # a corpus file that reads as nothing is refused, never ignored
            with pytest.raises(InputError, match="no document could be read"):
                run_ingest(MineConfig(pairs=pairs, out=root / "out", **keys), root / "stage")
            return
    info = run_ingest(MineConfig(pairs=pairs, out=root / "out", **keys), root / "stage")
    check_tables(root / "stage")
    assert info["pairs"] + sum(info["rejected_pairs"].values()) == sum(1 for line in lines if line.strip())


# ---------------------------------------------------------------------------- the whole run
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory)


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress bars libraries imported before `-q` took effect draw (an
    artefact of running main() in-process; test_fatal_error_through_the_real_command_line checks
    a real process's stderr whole)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "|" not in line]


def check_run(code: int, stderr: str, out: Path) -> None:
    """A run ends in a dataset that accounts for every pair, or in one line and exit code 2
    because nothing usable was left; never in a traceback."""
    assert "Traceback" not in stderr
    if currently_in_test_context():
        event(f"exit code {code}")
    if code == 2:
        lines = error_lines(stderr)
        assert len(lines) == 1 and lines[0].startswith("hardneg: error: "), stderr
        # Nothing usable left: no pair, no document, or no word BM25 (read by a default filter)
        # can index.
        assert any(m in lines[0] for m in ("no usable pairs", "corpus is empty", "no tokens after tokenisation",
                                           "no document could be read")), lines[0]
        assert not out.exists()
        return
    assert code == 0, stderr
    import datasets

    stats = json.loads((out / "stats.json").read_text())
    rejected = stats["rejected_pairs"]
    assert stats["input_pairs"] == stats["output_pairs"] + sum(rejected.values()), stats
    rejects = read_table(out / "rejects", schemas.REJECTS)
    assert rejects.num_rows == sum(stats["rejects"].values())
    by_reason: dict[str, int] = {}
    for row in rejects.filter(rejects.column("pair")).to_pylist():
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    assert by_reason == rejected
    rows = datasets.load_from_disk(str(out)).num_rows
    k = stats["config"]["num_negatives"]
    fmt = stats["config"]["format"]
    if fmt == "n-tuple" or fmt == "labeled-list":
        assert rows == stats["output_pairs"]
    elif fmt == "triplet":
        assert rows == stats["output_pairs"] * k
    assert leftovers(out.parent) == []


@settings(max_examples=25, **SETTINGS)
@given(corpus=corpus_lines, queries=query_lines, qrels=qrels_lines(), positives=st.sampled_from(["all", "best"]),
       fmt=st.sampled_from(["n-tuple", "triplet", "labeled-pair", "labeled-list"]), k=st.integers(1, 3))
@pytest.mark.slow
def test_hostile_beir_folder_end_to_end(tmp_path, tiny, corpus, queries, qrels, positives, fmt, k):
    root = _fresh(tmp_path)
    beir = make_beir(root / "beir", corpus, queries, qrels)
    out = root / "out"
    code, stderr = cli_in_process(["mine", "--beir", str(beir), "--out", str(out), "--work-dir", str(root / "work"),
                                   "--model", str(tiny), "--runner", "local", "--positives", positives, "--format", fmt,
                                   "--num-negatives", str(k), "-q"])
    check_run(code, stderr, out)
    if code == 0:
        stats = json.loads((out / "stats.json").read_text())
        assert stats["input_pairs"] == expected_pairs(qrels, positives)


@settings(max_examples=20, **SETTINGS)
@given(lines=pair_lines(), corpus=corpus_lines, with_corpus=st.booleans(), fmt=st.sampled_from(["n-tuple", "labeled-list"]))
def test_hostile_pair_file_end_to_end(tmp_path, tiny, lines, corpus, with_corpus, fmt):
    root = _fresh(tmp_path)
    args = ["mine", "--pairs", str(write_lines(root / "pairs.jsonl", lines)), "--out", str(root / "out"),
            "--work-dir", str(root / "work"), "--model", str(tiny), "--runner", "local", "--format", fmt,
            "--num-negatives", "1", "--set", "query_column=query", "--set", "positive_column=positive", "-q"]
    if with_corpus:
        args += ["--corpus", str(write_lines(root / "corpus.jsonl", [b for b, _ in corpus]))]
    code, stderr = cli_in_process(args)
    check_run(code, stderr, root / "out")
    if code == 0:
        stats = json.loads((root / "out" / "stats.json").read_text())
        assert stats["input_pairs"] == sum(1 for line in lines if line.strip())


@pytest.mark.slow
def test_hostile_files_through_the_real_command_line(tmp_path, tiny):
    """One subprocess run on a folder with one line of every kind: exit 0, no traceback, the
    identity holds and each kind of bad line is a reject with its reason."""
    corpus = [json.dumps({"_id": str(i), "title": "t", "text": f"{WORDS[i]} {WORDS[i + 1]} flow"}).encode() for i in range(1, 9)]
    corpus += [b'{"_id": "1", "text": "duplicate"}', b'{"_id": "20", "text": "   "}', b'{"_id": "21", "text": 7}',
               b"{broken", b'{"_id": "22", "text": "\xff"}', b'{"_id": "23", "text": "\\ud800"}', b'{"text": "no id"}',
               json.dumps({"_id": "big", "text": MB_TEXT, "unknown": [1, 2]}).encode(), b'{"_id": "../../evil", "text": "evil wing"}']
    queries = [json.dumps({"_id": q, "text": f"{WORDS[int(q)]} wing"}).encode() for q in ("1", "2", "3")]
    queries += [b'{"_id": "4", "text": ""}', b'{"_id": "1", "text": "dup"}', b"[]"]
    qrels = [b"query-id\tcorpus-id\tscore", b"1\t1\t1", b"1\t2\t2", b"2\t3\t1", b"3\tbig\t1", b"3\t../../evil\t1",
             b"1\tmissing\t1", b"missing\t1\t1", b"4\t1\t1", b"2\t21\t1", b"1\t1\t1", b"2\t4\t0", b"junk", b"1\t\xff\t1"]
    beir = tmp_path / "beir"
    write_lines(beir / "corpus.jsonl", corpus)
    write_lines(beir / "queries.jsonl", queries)
    write_lines(beir / "qrels" / "test.tsv", qrels)
    out = tmp_path / "out"
    run = Run([sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(beir), "--out", str(out), "--work-dir",
               str(tmp_path / "work"), "--model", str(tiny), "--runner", "local", "--num-negatives", "2",
               "--positives", "all"], tmp_path, "hostile")
    assert run.wait(600) == 0, run.stderr[-3000:]
    check_run(0, run.stderr, out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["input_pairs"] == 12
    reasons = read_table(out / "rejects", schemas.REJECTS).column("reason").to_pylist()
    for reason in ("duplicate_id", "empty_text", "wrong_type", "invalid_json", "invalid_utf8", "missing_id",
                   "unknown_document", "unknown_query", "duplicate_judgement", "malformed_qrels_line", "not_an_object"):
        assert reason in reasons, reason


# ---------------------------------------------------------------------------- fatal problems
def _fatal(args: list[str], out: Path, *dirs: Path) -> str:
    code, stderr = cli_in_process(args)
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hardneg: error: "), (code, stderr[-3000:])
    assert not out.exists(), "a failed run left an output folder"
    for folder in (out.parent, *dirs):
        assert leftovers(folder) == [], f"half-written files left in {folder}"
    return lines[0]


@pytest.fixture
def small(tmp_path) -> Path:
    corpus = [json.dumps({"_id": str(i), "text": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}"}).encode() for i in range(12)]
    queries = [json.dumps({"_id": f"q{i}", "text": f"{WORDS[i]} wing"}).encode() for i in range(3)]
    beir = tmp_path / "beir"
    write_lines(beir / "corpus.jsonl", corpus)
    write_lines(beir / "queries.jsonl", queries)
    write_lines(beir / "qrels" / "test.tsv", [b"query-id\tcorpus-id\tscore"] + [f"q{i}\t{i}\t1".encode() for i in range(3)])
    return beir


def _args(beir: Path, out: Path, work: Path, model: Path | str, *extra: str) -> list[str]:
    return ["mine", "--beir", str(beir), "--out", str(out), "--work-dir", str(work), "--model", str(model),
            "--runner", "local", "--num-negatives", "2", "-q", *extra]


def test_missing_inputs_are_one_line_and_exit_2(tmp_path, small, tiny):
    out = tmp_path / "o" / "out"
    assert "missing" in _fatal(_args(tmp_path / "nowhere", out, tmp_path / "w", tiny), out)
    assert "not found" in _fatal(["mine", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(out), "-q"], out)
    (small / "qrels" / "test.tsv").rename(small / "qrels" / "dev.tsv")
    assert "qrels/test.tsv" in _fatal(_args(small, out, tmp_path / "w", tiny), out)


def test_empty_corpus_is_one_line_and_exit_2(tmp_path, small, tiny):
    out = tmp_path / "o" / "out"
    (small / "corpus.jsonl").write_bytes(b"")
    assert "corpus is empty" in _fatal(_args(small, out, tmp_path / "w", tiny), out, tmp_path / "w")
    (small / "corpus.jsonl").write_bytes(b'{"_id": "1", "text": "   "}\n{broken\n')
    assert "corpus is empty" in _fatal(_args(small, out, tmp_path / "w", tiny), out, tmp_path / "w")


def test_unloadable_models_are_one_line_and_exit_2(tmp_path, small, tiny):
    out = tmp_path / "o" / "out"
    assert "no model found" in _fatal(_args(small, out, tmp_path / "w", "/nonexistent"), out)
    assert not (tmp_path / "w").exists(), "a missing model should fail before anything is written"
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny, broken)
    (broken / "config.json").write_text("{not json")
    (broken / "modules.json").unlink()
    message = _fatal(_args(small, out, tmp_path / "w", broken), out, tmp_path / "w")
    assert "model" in message and str(broken) in message, message
    # Configs fine, weights truncated: fails where the model loads, in the embedding stage.
    shutil.rmtree(broken)
    shutil.copytree(tiny, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = _fatal(_args(small, out, tmp_path / "w", broken), out, tmp_path / "w")
    assert "cannot be loaded" in message and str(broken) in message, message


def test_output_under_a_regular_file_is_one_line_and_exit_2(tmp_path, small, tiny):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    message = _fatal(_args(small, out, blocker / "work", tiny), out)
    assert str(blocker) in message, message
    message = _fatal(_args(small, out, tmp_path / "w", tiny), out, tmp_path / "w")
    assert str(blocker) in message, message
    assert blocker.read_text() == "not a folder"


def test_existing_file_or_foreign_folder_as_output_is_refused(tmp_path, small, tiny):
    """--out naming a file or a folder hardneg did not write is refused, never replaced."""
    out = tmp_path / "mine.txt"
    out.write_text("keep me")
    code, stderr = cli_in_process(_args(small, out, tmp_path / "w", tiny))
    assert code == 2 and out.read_text() == "keep me", stderr
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_text("keep me too")
    code, stderr = cli_in_process(_args(small, folder, tmp_path / "w", tiny))
    assert code == 2 and (folder / "a.jpg").read_text() == "keep me too" and len(list(folder.iterdir())) == 1, stderr
    assert "not a hardneg output" in stderr


def _mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small or read-only tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_output_is_one_line_and_exit_2(tmp_path, small, tiny):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "ro,size=64k")
    try:
        message = _fatal(_args(small, ro / "out", ro / "work", tiny), ro / "out")
        assert "read-only" in message, message
        message = _fatal(_args(small, ro / "out", tmp_path / "w", tiny), ro / "out", tmp_path / "w")
        assert "read-only" in message, message
    finally:
        _umount(ro)


def _fill(folder: Path, leave: int) -> None:
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_no_space_left_is_one_line_and_exit_2(tmp_path, small, tiny):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=200k")
    try:
        # The output's disk fills up while the dataset is written (the work dir is elsewhere).
        _fill(disk, 8 * 1024)
        message = _fatal(_args(small, disk / "out", tmp_path / "w", tiny), disk / "out", tmp_path / "w")
        assert "no space left" in message, message
        # The work dir's disk fills up while a stage writes its shards.
        (disk / "filler").unlink()
        _fill(disk, 4 * 1024)
        message = _fatal(_args(small, tmp_path / "o" / "out", disk / "work", tiny), tmp_path / "o" / "out", disk / "work")
        assert "no space left" in message, message
        if (disk / "work").is_dir():
            assert [p.name for p in (disk / "work").iterdir() if not p.name.startswith(".")] == [], "a stage was committed on a full disk"
    finally:
        _umount(disk)
    # With room again, the same run completes.
    code, stderr = cli_in_process(_args(small, tmp_path / "o" / "out", tmp_path / "w", tiny))
    assert code == 0, stderr


@pytest.mark.slow
def test_fatal_error_through_the_real_command_line(tmp_path, small):
    """The one-line contract holds for a real process too (not only for main() in-process)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(small), "--out", str(blocker / "out"),
                           "--runner", "local", "-q"], capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("hardneg: error: "), proc.stderr


# ---------------------------------------------------------------------------- the probe's faults
# Each test below failed before its fix (issue 11: a probe of the CLI with hostile inputs).
def _gzip(path: Path) -> Path:
    import gzip

    target = path.with_name(path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return target


def test_gzipped_beir_folder_is_read_like_the_plain_one(tmp_path, small, tiny):
    """BEIR collections ship corpus.jsonl.gz / queries.jsonl.gz: read them, same rows."""
    plain_out = tmp_path / "plain"
    assert cli_in_process(_args(small, plain_out, tmp_path / "w1", tiny))[0] == 0
    _gzip(small / "corpus.jsonl")
    _gzip(small / "queries.jsonl")
    _gzip(small / "qrels" / "test.tsv")
    out = tmp_path / "gz"
    code, stderr = cli_in_process(_args(small, out, tmp_path / "w2", tiny))
    assert code == 0, stderr
    plain, gz = (json.loads((o / "stats.json").read_text()) for o in (plain_out, out))
    assert gz["input_pairs"] == plain["input_pairs"] == 3 and gz["output_pairs"] == plain["output_pairs"]
    import datasets

    assert datasets.load_from_disk(str(out))["negative_ids"] == datasets.load_from_disk(str(plain_out))["negative_ids"]


def _pairs_and_corpus(root: Path) -> tuple[Path, Path]:
    pairs = write_lines(root / "pairs.jsonl", [json.dumps({"query": f"{WORDS[i]} wing", "positive": f"{WORDS[i + 1]} flow"}).encode()
                                              for i in range(3)])
    corpus = write_lines(root / "corpus.jsonl", [json.dumps({"_id": f"c{i}", "text": f"{WORDS[i]} {WORDS[i + 5]} layer"}).encode()
                                                 for i in range(10)])
    return pairs, corpus


def test_gzipped_corpus_of_a_pair_file_is_mined_not_ignored(tmp_path):
    pairs, corpus = _pairs_and_corpus(tmp_path)
    info = run_ingest(MineConfig(pairs=_gzip(pairs), corpus=_gzip(corpus), out=tmp_path / "out"), tmp_path / "stage")
    assert info["pairs"] == 3 and info["corpus_rows"] == 13, info  # 10 corpus documents + 3 positives
    assert info["rejects"] == {}


def test_corpus_file_of_which_nothing_reads_is_one_line_not_the_positives_alone(tmp_path, tiny, small):
    pairs, _ = _pairs_and_corpus(tmp_path)
    corpus = write_lines(tmp_path / "docs.jsonl", [b"\x1f\x8b\x08 not really gzip", b'{"id": "no _id column"}'])
    out = tmp_path / "o" / "out"
    message = _fatal(["mine", "--pairs", str(pairs), "--corpus", str(corpus), "--out", str(out), "--work-dir",
                      str(tmp_path / "w"), "--model", str(tiny), "--runner", "local", "-q"], out)
    assert "corpus" in message and str(corpus) in message, message


def test_csv_and_tsv_pair_files_are_read(tmp_path):
    rows = [("what is lift", "lift, a force on wings"), ('the "drag" of a body', "drag resists\nmotion"), ("heat", "heat flows")]
    import csv
    import gzip

    for name, delimiter in (("pairs.csv", ","), ("pairs.tsv", "\t"), ("pairs.csv.gz", ",")):
        root = _fresh(tmp_path)
        path = root / name
        text = io_text = __import__("io").StringIO()
        writer = csv.writer(io_text, delimiter=delimiter)
        writer.writerow(["query", "positive", "source"])
        writer.writerows([(q, p, "probe") for q, p in rows])
        data = text.getvalue().encode() + b"only one cell\n" + f"bad{delimiter}\xff\xfe{delimiter}x\n".encode("latin-1")
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        info = run_ingest(MineConfig(pairs=path, out=root / "out"), root / "stage")
        check_tables(root / "stage")
        assert info["pairs"] == 3, (name, info)
        assert info["rejected_pairs"] == {"malformed_csv_row": 1, "invalid_utf8": 1}, (name, info)
        texts = sorted(read_table(root / "stage" / "corpus", schemas.CORPUS).column("text").to_pylist())
        assert texts == sorted(p.replace("\n", "\n") for _, p in rows), texts


def test_unknown_pair_or_corpus_format_is_refused_by_name(tmp_path, tiny):
    out = tmp_path / "o" / "out"
    for name in ("pairs.xlsx", "pairs.txt", "pairs.parquet.gz"):
        (tmp_path / name).write_bytes(b"query,positive\na,b\n")
        message = _fatal(["mine", "--pairs", str(tmp_path / name), "--out", str(out), "--model", str(tiny), "--runner", "local", "-q"], out)
        assert name in message and ("unknown format" in message or "Parquet" in message), message
    pairs, _ = _pairs_and_corpus(tmp_path)
    (tmp_path / "corpus.xml").write_text("<docs/>")
    message = _fatal(["mine", "--pairs", str(pairs), "--corpus", str(tmp_path / "corpus.xml"), "--out", str(out), "-q"], out)
    assert "corpus.xml" in message and "unknown format" in message, message


def test_positive_text_conflicting_with_its_id_is_a_reject(tmp_path):
    lines = [{"q": "what is lift", "p": "lift is a force", "pid": "d1"},
             {"q": "what is drag", "p": "drag resists motion", "pid": "d1"},   # d1 again, another text
             {"q": "what is heat", "p": "lift is a force", "pid": "d1"},       # d1 again, its own text: fine
             {"q": "what is mach", "p": "a title and its text", "pid": "c1"},  # the corpus's c1 without its title
             {"q": "what is wave", "p": "something else", "pid": "c1"}]       # contradicts the corpus's c1
    pairs = write_lines(tmp_path / "pairs.jsonl", [json.dumps(r).encode() for r in lines])
    corpus = write_lines(tmp_path / "corpus.jsonl", [json.dumps({"_id": "c1", "title": "Title", "text": "a title and its text"}).encode()])
    config = MineConfig(pairs=pairs, corpus=corpus, out=tmp_path / "out", query_column="q", positive_column="p", positive_id_column="pid")
    info = run_ingest(config, tmp_path / "stage")
    check_tables(tmp_path / "stage")
    assert info["pairs"] == 3 and info["rejected_pairs"] == {"conflicting_positive_text": 2}, info
    assert info["pairs"] + sum(info["rejected_pairs"].values()) == len(lines)
    texts = dict(zip(*read_table(tmp_path / "stage" / "corpus", schemas.CORPUS).to_pydict().values()))
    assert texts["d1"] == "lift is a force"


def test_invalid_faiss_factory_string_fails_at_config_time(tmp_path, small, tiny):
    out = tmp_path / "o" / "out"
    message = _fatal(_args(small, out, tmp_path / "w", tiny, "--set", "index.index=Garbage"), out)
    assert "Garbage" in message and "FAISS" in message, message
    assert not (tmp_path / "w").exists(), "the factory string must be refused before anything is computed"
    # A string that parses for some vector size but not the model's: refused before the index is built.
    message = _fatal(_args(small, out, tmp_path / "w", tiny, "--set", "index.index=PQ7"), out, tmp_path / "w")
    assert "PQ7" in message and "16-dimensional" in message, message


def test_index_gpu_accepts_on_and_off_as_the_readme_writes_them(tmp_path):
    from hardneg.pipeline.config import build_config
    from hardneg.stages.engines.faiss_index import gpu_available

    for word, value in (("on", "on"), ("off", "off"), ("auto", "auto"), ("'on'", "on"), ("true", "on"), ("false", "off")):
        assert build_config(None, {}, [f"index.gpu={word}"]).index.gpu == value, word
    config_file = tmp_path / "hardneg.yaml"
    config_file.write_text("index:\n  gpu: off\n")
    assert build_config(config_file).index.gpu == "off"
    if gpu_available():
        pytest.skip("this machine has a GPU: index.gpu=on is valid here")


def test_index_gpu_on_without_a_gpu_fails_at_config_time(tmp_path, small, tiny):
    from hardneg.stages.engines.faiss_index import gpu_available, gpu_status

    if gpu_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "o" / "out"
    message = _fatal(_args(small, out, tmp_path / "w", tiny, "--set", "index.gpu=on"), out)
    assert "index.gpu=on" in message and "GPU" in message, message
    assert gpu_status()[1] in message, message  # why faiss cannot use one here
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("setting, words", [
    (["--num-negatives", "20", "--set", "range_max=10"], "can never be met"),
    (["--set", "quotas={dense: -1}"], "cannot be negative"),
    (["--set", "quotas={bm25: 1}"], "not among the miners"),
])
def test_impossible_sampling_settings_fail_at_config_time(tmp_path, small, tiny, setting, words):
    out = tmp_path / "o" / "out"
    args = _args(small, out, tmp_path / "w", tiny)
    message = _fatal(args[:args.index("--num-negatives")] + args[args.index("--num-negatives") + 2:] + setting, out)
    assert words in message, message
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("layout", ["same", "work_inside_out", "out_inside_work"])
def test_output_and_work_dir_that_overlap_are_refused(tmp_path, small, tiny, layout):
    out = tmp_path / "data"
    work = {"same": out, "work_inside_out": out / "cache", "out_inside_work": tmp_path}[layout]
    code, stderr = cli_in_process(_args(small, out, work, tiny))
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1 and "work dir" in lines[0] and "output" in lines[0], stderr
    assert not out.exists() and not (out / "cache").exists()


def test_symlink_to_a_folder_is_accepted_as_the_output(tmp_path, small, tiny):
    target = tmp_path / "disk" / "out"
    target.mkdir(parents=True)
    link = tmp_path / "out-link"
    link.symlink_to(target, target_is_directory=True)
    code, stderr = cli_in_process(_args(small, link, tmp_path / "w", tiny))
    assert code == 0, stderr
    assert link.is_symlink() and (target / "hardneg.json").is_file()
    import datasets

    stats = json.loads((link / "stats.json").read_text())
    assert stats["input_pairs"] == 3 and datasets.load_from_disk(str(link)).num_rows == stats["output_pairs"]


def test_damaged_output_is_rebuilt_not_reused(tmp_path, small, tiny):
    import datasets

    from hardneg.pipeline.api import run_mine
    from hardneg.pipeline.config import build_config

    config = build_config(None, dict(beir=small, out=tmp_path / "out", work_dir=tmp_path / "w", model=str(tiny),
                                     runner="local", num_negatives=2))
    first = run_mine(config, progress=False)
    rows = datasets.load_from_disk(str(first.out))["negative_ids"]
    assert run_mine(config, progress=False).computed == [], "an intact output is reused"
    for damage in ("delete", "truncate"):
        shard = next((tmp_path / "out").glob("*.arrow"))
        shard.unlink() if damage == "delete" else shard.write_bytes(shard.read_bytes()[:100])
        again = run_mine(config, progress=False)
        assert again.computed == ["write"], (damage, again.computed)
        assert datasets.load_from_disk(str(again.out))["negative_ids"] == rows
