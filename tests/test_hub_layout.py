"""`--layout hub`: data/*.parquet plus a dataset card that `datasets.load_dataset` and
huggingface_hub read; `--push-to-hub` (which cannot reach the Hub here: only its failures are
checked, each one line, never a traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import read_qrels

HARDNEG = Path(sys.executable).parent / "hardneg"
TEXT = ["query", "positive", "negative_1", "negative_2", "negative_3"]


def _root(small_beir: Path) -> Path:
    """Outputs of this file and test_report/test_api sit side by side, so they share one work dir
    (`.hardneg-work` beside them): the subset is embedded once per session."""
    return small_beir.parent / "ecosystem"


def _args(small_beir: Path, out: Path) -> list[str]:
    return ["--beir", str(small_beir), "--out", str(out), "--positives", "best", "--num-negatives", "3",
            "--miners", "dense,bm25", "--runner", "local"]


@pytest.fixture(scope="module")
def hub_out(small_beir) -> Path:
    from hardneg import MineConfig, run_mine

    out = _root(small_beir) / "hub"
    config = MineConfig(beir=small_beir, out=out, layout="hub", positives="best", num_negatives=3,
                        miners=["dense", "bm25"], runner="local")
    run_mine(config, progress=False)
    return out


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_load_dataset_reads_the_hub_layout(hub_out, small_beir):
    import datasets

    assert (hub_out / "data" / "train-00000-of-00001.parquet").is_file()
    assert (hub_out / "README.md").is_file()
    ds = datasets.load_dataset(str(hub_out), split="train")
    stats = json.loads((hub_out / "stats.json").read_text())
    queries = len({q for q, _, s in read_qrels(small_beir) if s > 0})
    assert ds.num_rows == stats["output_pairs"] >= 20 and ds.num_rows + sum(stats["rejected_pairs"].values()) == queries == 30
    assert ds.column_names[:5] == TEXT
    assert {"query_id", "negative_ids", "negative_scores", "negative_sources"} <= set(ds.column_names)
    # Only data/ is data: the rejects beside it never leak into the train split.
    assert all(len(ids) == 3 for ids in ds["negative_ids"])


def test_card_front_matter(hub_out):
    import datasets

    meta, body = _front_matter((hub_out / "README.md").read_text())
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    assert meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == ["sentence-similarity", "text-retrieval"]
    assert {"hard-negatives", "sentence-transformers", "hardneg"} <= set(meta["tags"])
    info = meta["dataset_info"]
    ds = datasets.load_dataset(str(hub_out), split="train")
    assert [f["name"] for f in info["features"]] == ds.column_names
    assert {f["name"]: f for f in info["features"]}["query"]["dtype"] == "string"
    assert info["splits"][0]["name"] == "train" and info["splits"][0]["num_examples"] == ds.num_rows
    # The features in the card are the dataset's own (datasets reads them back identically).
    assert datasets.Features._from_yaml_list(info["features"]) == ds.features


def test_card_parses_with_huggingface_hub(hub_out):
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(hub_out / "README.md")
    assert card.data.configs[0]["data_files"][0]["path"] == "data/*.parquet"
    assert card.data.task_categories == ["sentence-similarity", "text-retrieval"]
    assert DatasetCard(card.content).data.size_categories == ["n<1K"]


def test_card_body_config_models_stats_eval(hub_out):
    from hardneg.stages.models import model_fingerprint

    text = (hub_out / "README.md").read_text()
    _, body = _front_matter(text)
    for section in ("## Models", "## Statistics", "## Evaluation", "## Mining config"):
        assert section in body
    config = yaml.safe_load(body.split("## Mining config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config["num_negatives"] == 3 and config["miners"] == ["dense", "bm25"] and config["layout"] == "hub"
    assert config["beir"] == "beir"  # by name: local paths stay out of a published card
    assert "out" not in config and "work_dir" not in config and "runner" not in config
    assert model_fingerprint("all-MiniLM-L6-v2")["content"] in body
    written = json.loads((hub_out / "stats.json").read_text())["output_pairs"]
    assert f"| positive | {written} |" in body and f"| written | {written} |" in body
    # The eval table against the BEIR input's qrels (no judged positive is ever a negative).
    assert "| negatives | false negatives | fn_rate |" in body
    assert f"| {3 * written} | 0 | 0.0000 |" in body


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HARDNEG), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_push_to_hub_option_is_documented():
    done = _cli(["mine", "--help"], COLUMNS="200")
    assert done.returncode == 0
    assert "--push-to-hub" in done.stdout


@pytest.mark.parametrize("extra, env, message", [
    (["--push-to-hub", "someone/hardneg-test"], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
    (["--push-to-hub", "not a repo"], {"HF_HUB_OFFLINE": "0"}, "not a Hub repo id"),
    (["--push-to-hub", "someone/hardneg-test", "--layout", "disk"], {"HF_HUB_OFFLINE": "0"}, "hub layout"),
])
def test_push_to_hub_fails_fast_in_one_line(small_beir, tmp_path, extra, env, message):
    """Checked before any mining: the output folder is never created."""
    out = tmp_path / "out"
    done = _cli(["mine", *_args(small_beir, out), *extra], **env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("hardneg: error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


def test_push_to_hub_without_network_fails_in_one_line_after_writing(hub_out, small_beir):
    """The upload itself fails (an endpoint nothing listens on stands in for no network): one
    line naming the retry command, exit 2, and the output is complete on disk."""
    done = _cli(["mine", *_args(small_beir, hub_out), "--push-to-hub", "someone/hardneg-test", "-q"],
                HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5",
                HF_TOKEN="hf_not_a_real_token")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("hardneg: error: could not push") and "hf upload someone/hardneg-test" in lines[0]
    assert (hub_out / "README.md").is_file() and (hub_out / "data").is_dir()
