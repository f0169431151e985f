"""The pipeline end to end on the Cranfield sample (issue: a BEIR corpus in, a dataset out)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from helpers import CRANFIELD, read_qrels, write_beir, read_jsonl
from resilience import done_stages, reused_stages
from hardneg import MineConfig, run_mine

pytestmark = pytest.mark.slow


def judged(folder: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for q, d, s in read_qrels(folder):
        if s > 0:
            out.setdefault(q, set()).add(d)
    return out


def test_cranfield_ntuple_has_225_rows_and_no_judged_negative(cranfield_run):
    ds = datasets.load_from_disk(str(cranfield_run.out))
    assert ds.num_rows == 225
    assert ds.column_names[:7] == ["query", "positive", *[f"negative_{i}" for i in range(1, 6)]]
    relevant = judged(CRANFIELD)
    for row in ds:
        assert len(row["negative_ids"]) == 5
        assert not set(row["negative_ids"]) & relevant[row["query_id"]], row["query_id"]
        assert row["positive_id"] in relevant[row["query_id"]]
    stats = json.loads((cranfield_run.out / "stats.json").read_text())
    assert stats["input_pairs"] == stats["output_pairs"] + sum(stats["rejected_pairs"].values())


def test_rerun_embeds_nothing_and_writes_identical_rows(cranfield_run):
    before = datasets.load_from_disk(str(cranfield_run.out)).to_pandas()
    config = MineConfig(beir=CRANFIELD, out=cranfield_run.out, work_dir=cranfield_run.work_dir, num_negatives=5,
                        format="n-tuple", positives="best", runner="ray")
    again = run_mine(config, progress=False)
    assert again.computed == []
    assert {"embed_corpus", "embed_queries", "index", "candidates"} <= set(again.reused)
    after = datasets.load_from_disk(str(cranfield_run.out)).to_pandas()
    assert before.equals(after)


def test_changing_num_negatives_reruns_only_sampling_and_writing(cranfield_run, warm_work_dir, tmp_path):
    config = MineConfig(beir=CRANFIELD, out=tmp_path / "out3", work_dir=warm_work_dir, num_negatives=3,
                        format="n-tuple", positives="best", runner="ray")
    result = run_mine(config, progress=False)
    assert set(result.computed) == {"sample", "write"}
    ds = datasets.load_from_disk(str(tmp_path / "out3"))
    assert ds.num_rows == 225 and "negative_3" in ds.column_names and "negative_4" not in ds.column_names


def test_cli_rerun_log_names_reused_stages(cranfield_run, warm_work_dir, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(CRANFIELD), "--out", str(out),
           "--num-negatives", "5", "--format", "n-tuple", "--positives", "best", "--work-dir", str(warm_work_dir),
           "--runner", "local"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # One line per stage: `<stage>  reused  (<fingerprint>)` or `<stage>  done  (<fingerprint>) in ...`.
    assert "embed_corpus" in reused_stages(proc.stderr)
    assert done_stages(proc.stderr) == {"write"}
    assert "225 rows" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["--set", "no_such_key=1"], "no_such_key: unknown config key"),
    (["--num-negatives", "0"], "num_negatives"),
    (["--set", "range_max=abc"], "range_max"),
    (["--model", "/nonexistent/model"], "no model found"),
])
def test_config_errors_are_one_line_and_exit_2(small_beir, tmp_path, args, needle):
    cmd = [sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(small_beir), "--out", str(tmp_path / "o"),
           "--runner", "local", "-q", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hardneg.pipeline.cli", "mine", "--beir", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing corpus.jsonl" in proc.stderr


def test_corrupted_lines_end_in_rejects_and_accounting(tmp_path, small_beir):
    folder = tmp_path / "bad"
    corpus = read_jsonl(small_beir / "corpus.jsonl")
    queries = read_jsonl(small_beir / "queries.jsonl")
    qrels = read_qrels(small_beir)
    write_beir(folder, corpus, queries, qrels + [(queries[0]["_id"], "missing-doc", 2)])
    with open(folder / "corpus.jsonl", "a") as handle:
        handle.write('{"_id": "broken", "text": \n')            # invalid JSON
        handle.write('{"_id": "empty", "text": "   "}\n')        # no text
        handle.write(json.dumps(corpus[0]) + "\n")              # duplicate id
    out = tmp_path / "out"
    result = run_mine(MineConfig(beir=folder, out=out, runner="local", num_negatives=3), progress=False)
    rejects = datasets.Dataset.from_parquet(str(out / "rejects" / "rejects-00000.parquet")).to_pandas()
    assert {"invalid_json", "empty_text", "duplicate_id", "unknown_document"} <= set(rejects["reason"])
    assert rejects.loc[rejects.reason == "invalid_json", "line"].tolist() == [len(corpus) + 1]
    stats = result.stats
    assert stats["rejected_pairs"]["unknown_document"] == 1
    assert stats["input_pairs"] == len([r for r in qrels if r[2] > 0]) + 1
    assert stats["input_pairs"] == stats["output_pairs"] + sum(stats["rejected_pairs"].values())


def test_mined_dataset_trains_two_steps(small_beir, tmp_path):
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from hardneg.stages.models import resolve_model

    out = tmp_path / "out"
    run_mine(MineConfig(beir=small_beir, out=out, runner="local", num_negatives=2, positives="best"), progress=False)
    ds = datasets.load_from_disk(str(out)).select_columns(["query", "positive", "negative_1", "negative_2"])
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    before = [p.detach().clone() for p in model.parameters()][:3]
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "train"), max_steps=2, per_device_train_batch_size=4,
                                                report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=MultipleNegativesRankingLoss(model))
    output = trainer.train()
    assert output.global_step == 2
    after = list(model.parameters())[:3]
    assert any(not (a == b).all() for a, b in zip(after, before))
