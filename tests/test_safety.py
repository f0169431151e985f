"""Guarantee 6, safe by default: models never run their own code unless `trust_remote_code` is
set; nothing hardneg reads (inputs, its own caches) is unpickled; and no id in the data can
make hardneg write outside the work dir and the output the user named."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from hardneg.pipeline.config import MineConfig, build_config
from hardneg.pipeline.runner import Pipeline
from resilience import ROOT, cli_in_process, tiny_model
from hardneg.stages.base import StageResult

WORDS = ("flow", "boundary", "layer", "shock", "wave", "heat", "transfer", "wing", "supersonic", "pressure")


def _beir(folder: Path, doc_ids: list[str], query_ids: list[str]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "text": f"{WORDS[i % 10]} {WORDS[(i + 3) % 10]} {WORDS[(i + 7) % 10]}"}) + "\n"
        for i, d in enumerate(doc_ids)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q, "text": f"{WORDS[i % 10]} wing"}) + "\n" for i, q in enumerate(query_ids)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{doc_ids[i]}\t1\n" for i, q in enumerate(query_ids)))
    return folder


# ---------------------------------------------------------------------------- remote code
def test_trust_remote_code_is_off_by_default():
    assert MineConfig.model_fields["trust_remote_code"].default is False
    assert build_config(None, {}, []).trust_remote_code is False
    assert build_config(None, {}, ["trust_remote_code=true"]).trust_remote_code is True


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_model_load(tmp_path, monkeypatch, trust):
    """The flag travels from the config to every model stage the runner builds, and from each
    stage to the sentence-transformers constructor it calls."""
    beir = _beir(tmp_path / "beir", ["1", "2"], ["q1"])
    # torch: the fake model below stands in for sentence-transformers' classes, not OpenVINO's engine.
    keys = dict(beir=beir, out=tmp_path / "out", cross_encoder="some/cross-encoder", runner="local", embed_backend="torch")
    if trust:
        keys["trust_remote_code"] = True
    pipe = Pipeline(MineConfig(**keys), progress=False)
    built = []

    def fake_run(stage, upstream, inputs, map_input=None, in_process=False):
        built.append(stage)
        return StageResult(stage.name, tmp_path, "0" * 64, reused=True, info={"pairs": 1, "corpus_rows": 1})

    (tmp_path / "faiss").mkdir()  # the fake index stage's output: an exact index (no calibrate stage)
    (tmp_path / "faiss" / "index.json").write_text('{"factory": "Flat", "nprobe": null, "efSearch": null}')
    monkeypatch.setattr(pipe, "_run", fake_run)
    monkeypatch.setattr(pipe, "_write_output", lambda *a, **k: {})
    pipe._run_all()
    models = {s.name: s for s in built if hasattr(s, "trust_remote_code")}
    assert {"embed_queries", "embed_corpus", "rerank"} <= set(models)
    assert all(s.trust_remote_code is trust for s in models.values())

    import sentence_transformers

    calls = []

    class Fake:
        def __init__(self, *args, **kwargs):
            calls.append(kwargs)
            self.max_seq_length = 16

        def eval(self):
            return self

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Fake)
    monkeypatch.setattr(sentence_transformers, "CrossEncoder", Fake)
    (tmp_path / "corpus").mkdir()
    models["embed_corpus"]._load()  # what setup loads the model with (the fake has no tokenizer to go on)
    models["rerank"].corpus_dir = str(tmp_path / "corpus")
    models["rerank"].setup()
    assert [c["trust_remote_code"] for c in calls] == [trust, trust]


# ---------------------------------------------------------------------------- no pickle
FORBIDDEN = [
    (r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib|shelve|marshal)\b", "a pickle-family module"),
    (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
    (r"read_pickle|to_pickle", "pandas pickles"),
    (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", "torch.load without weights_only=True"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code hard-coded on"),
]


def test_no_pickle_loading_in_the_code():
    hits = []
    for folder in ("pipeline", "stages", "schemas"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                for pattern, what in FORBIDDEN:
                    if re.search(pattern, line):
                        hits.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


PICKLE_MAGIC = re.compile(rb"^\x80[\x02-\x05]")


def test_caches_and_output_hold_no_pickle(tmp_path_factory, tmp_path):
    """Every file a run writes is Parquet, Arrow, JSON, .npy (readable with allow_pickle=False),
    FAISS or text: none starts with a pickle header."""
    import numpy as np

    model = tiny_model(tmp_path_factory)
    beir = _beir(tmp_path / "beir", [str(i) for i in range(12)], ["q1", "q2", "q3"])
    code, stderr = cli_in_process(["mine", "--beir", str(beir), "--out", str(tmp_path / "out"), "--work-dir",
                                   str(tmp_path / "work"), "--model", str(model), "--runner", "local",
                                   "--num-negatives", "2", "--set", "miners=dense,bm25", "-q"])
    assert code == 0, stderr
    files = [p for p in list((tmp_path / "work").rglob("*")) + list((tmp_path / "out").rglob("*")) if p.is_file()]
    assert len(files) > 10
    for path in files:
        with open(path, "rb") as handle:
            head = handle.read(2)
        assert not PICKLE_MAGIC.match(head), f"{path} looks like a pickle"
        assert path.suffix not in (".pkl", ".pickle", ".pt", ".bin", ".joblib"), path
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False, mmap_mode="r")


# ---------------------------------------------------------------------------- paths
HOSTILE_IDS = ["../../evil", "../../../../tmp/evil", "/tmp/hardneg-evil-abs", "..", ".", "a/../../b", "~/evil", "C:\\evil",
               ".lock", ".tmp-evil", "manifest.json"]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_ids_never_become_paths(tmp_path_factory, tmp_path):
    """Ids that look like paths are data: every file a run creates is in the work dir, the
    output, or its lock beside the output — nothing appears elsewhere, even with hostile ids."""
    model = tiny_model(tmp_path_factory)
    area = tmp_path / "area"
    area.mkdir()
    beir = _beir(area / "beir", HOSTILE_IDS, HOSTILE_IDS[:6])
    pairs = area / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"qid": q, "query": f"{WORDS[i]} wing", "pid": q, "positive": f"{WORDS[i + 1]} flow"}) + "\n"
                             for i, q in enumerate(HOSTILE_IDS[:8])))
    before_area, before_root, before_tmp = _tree(area), _tree(ROOT), set(os.listdir("/tmp"))
    home = Path.home()
    before_home = set(os.listdir(home))
    runs = [
        ["--beir", str(beir), "--out", str(area / "out" / "beir"), "--work-dir", str(area / "work")],
        ["--pairs", str(pairs), "--out", str(area / "out" / "pairs"), "--work-dir", str(area / "work"),
         "--set", "query_column=query", "--set", "positive_column=positive",
         "--set", "query_id_column=qid", "--set", "positive_id_column=pid"],
    ]
    for args in runs:
        code, stderr = cli_in_process(["mine", *args, "--model", str(model), "--runner", "local", "--num-negatives", "2",
                                       "--format", "labeled-list", "-q"])
        assert code == 0, stderr
    created = _tree(area) - before_area
    allowed = ("work", "out")
    outside = sorted(p for p in created if p.split(os.sep)[0] not in allowed)
    assert not outside, outside
    assert _tree(ROOT) - before_root <= {p for p in _tree(ROOT) if ".hypothesis" in p or "__pycache__" in p}
    assert not {n for n in set(os.listdir("/tmp")) - before_tmp if "evil" in n}
    assert not {n for n in set(os.listdir(home)) - before_home if "evil" in n}
    # The ids come through unchanged, as data.
    import datasets

    beir_rows = datasets.load_from_disk(str(area / "out" / "beir"))
    assert set(beir_rows["query_id"]) <= set(HOSTILE_IDS) and "../../evil" in beir_rows["query_id"]
    pair_rows = datasets.load_from_disk(str(area / "out" / "pairs"))
    assert "../../evil" in pair_rows["query_id"]
