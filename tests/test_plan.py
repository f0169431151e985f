"""The declared stage graph (pipeline/plan.py): each stage's inputs are named once and the
runner derives upstream fingerprints and input folders from them. The derived upstreams are
the lists the runner used to write by hand, so stage outputs cached before the graph was
declared are reused (fingerprints unchanged) — except the lexical stage, added since: the
filter now reads its scores instead of the BM25 index."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardneg import MineConfig
from hardneg.pipeline.plan import Machine, Node, ancestors, check_plan, index_plan, mine_plan
from hardneg.pipeline.runner import _Done
from hardneg.pipeline.store import fingerprint
from hardneg.stages.base import Stage, StageResult
from hardneg.stages.ingest import IngestStage

ROOT = Path(__file__).resolve().parent.parent
CPU = Machine(device="cpu", precision="fp32", backend="torch", threads=1)


class _Ingest(Stage):
    name = "ingest"

    def part_fingerprint(self, part: str) -> str | None:
        return "fp-corpus" if part == "corpus" else None


def derived_upstreams(nodes: list[Node], skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """Every node's upstream fingerprints and input folders as the runner derives them, with
    each node's result faked as `fp-<name>` in `/work/<name>`."""
    done = _Done()
    upstreams = {}
    for node in nodes:
        if node.name in skip:
            continue
        inputs, upstream = done.resolve(node)
        upstreams[node.name] = upstream
        stage = _Ingest() if node.name == "ingest" else Stage()
        done.add(node.name, stage, StageResult(node.name, Path("/work") / node.name, f"fp-{node.name}", reused=False))
    return upstreams


def test_upstreams_are_those_the_runner_listed_by_hand():
    config = MineConfig(beir=ROOT / "examples/cranfield", out="o", miners="dense,bm25", cross_encoder="some/ce")
    assert derived_upstreams(mine_plan(config, CPU)) == {
        "ingest": [],
        "embed_queries": ["fp-ingest"],
        "embed_corpus": ["fp-corpus"],  # the corpus alone: changing the qrels re-embeds nothing
        "index": ["fp-corpus", "fp-embed_corpus"],
        "bm25_index": ["fp-corpus"],
        "calibrate": ["fp-index", "fp-embed_queries"],
        "candidates": ["fp-embed_queries", "fp-index", "fp-bm25_index", "fp-calibrate"],
        "rerank": ["fp-candidates"],
        "lexical": ["fp-rerank", "fp-bm25_index"],  # the positives' BM25 scores, kept apart from filter settings
        "filter": ["fp-lexical"],
        "sample": ["fp-filter"],
        "write": ["fp-ingest", "fp-filter", "fp-sample"],
    }


def test_a_skipped_node_is_absent_downstream():
    """calibrate runs for approximate indices only; when it is skipped candidates is keyed and
    built without it."""
    config = MineConfig(beir=ROOT / "examples/cranfield", out="o", filters=[])
    nodes = mine_plan(config, CPU)
    assert "bm25_index" not in [n.name for n in nodes]  # no miner or filter reads BM25
    upstreams = derived_upstreams(nodes, skip={"calibrate"})
    assert upstreams["candidates"] == ["fp-embed_queries", "fp-index"]
    assert upstreams["filter"] == ["fp-candidates"]


def test_every_input_a_stage_reads_is_declared():
    config = MineConfig(beir=ROOT / "examples/cranfield", out="o", miners="dense,bm25", sampling_strategy="mmr")
    nodes = {n.name: n for n in mine_plan(config, CPU)}
    # sample reads the index (mmr, consistency): declared, covered by its filter input's chain.
    assert nodes["sample"].inputs == {"filtered": "filter", "index": "index"} and nodes["sample"].covered == ("index",)
    assert nodes["lexical"].inputs["corpus"] == "ingest/corpus" and nodes["filter"].inputs == {"scored": "lexical"}
    done = _Done()
    for node in nodes.values():
        inputs, _ = done.resolve(node)
        assert set(inputs) == set(node.inputs) - ({"calibration"} if node.name == "candidates" else set())
        stage = _Ingest() if node.name == "ingest" else Stage()
        if node.name != "calibrate":  # left out as an exact index leaves it out
            done.add(node.name, stage, StageResult(node.name, Path("/w") / node.name, "x", reused=False))
    assert done.resolve(nodes["sample"])[0]["index"] == Path("/w/index")
    assert done.resolve(nodes["write"])[0]["rejects"] == Path("/w/ingest/rejects")


def test_precomputed_vectors_replace_the_embed_nodes():
    config = MineConfig(beir=ROOT / "examples/cranfield", out="o", corpus_embeddings="c.parquet",
                        query_embeddings="q.parquet")
    nodes = index_plan(config, CPU)
    assert [n.name for n in nodes] == ["ingest", "query_vectors", "corpus_vectors", "index"]
    assert derived_upstreams(nodes)["index"] == ["fp-corpus", "fp-corpus_vectors"]


def test_ancestors_are_what_a_target_needs_in_plan_order():
    nodes = mine_plan(MineConfig(beir=ROOT / "examples/cranfield", out="o", filters=[]), CPU)
    assert [n.name for n in ancestors(nodes, ["index"])] == ["ingest", "embed_corpus", "index"]


@pytest.mark.parametrize("nodes, message", [
    ([Node("a", Stage), Node("a", Stage)], "two nodes are named 'a'"),
    ([Node("a", Stage, {"x": "b"}), Node("b", Stage)], "reads 'b', which is not an earlier node"),
    ([Node("a", Stage), Node("b", Stage, {"x": "a"}, rows="y")], "streams 'y'"),
    ([Node("a", Stage), Node("b", Stage, {"x": "a"}, covered=("z",))], "covers inputs it does not read"),
])
def test_a_broken_plan_is_refused(nodes, message):
    with pytest.raises(ValueError, match=message):
        check_plan(nodes)


def test_ingest_fingerprints_are_unchanged():
    """Computed by the code before the graph was declared (and its typed sub-config): a work dir
    written then is reused now. Update only on purpose (a new CODE_VERSION or schema, or edited
    example files), knowing every cache is invalidated."""
    stage = IngestStage(MineConfig(beir=ROOT / "examples/cranfield", out="o").ingest_config())
    assert fingerprint(stage.name, stage.version, stage.fingerprint_config(), []) == (
        "e5714a6ddc5696f57f26dd0cf6f12ce09ba3f099d893e755593ab7855ef3814a")
    assert stage.part_fingerprint("corpus") == "588108939601eca1fcb5d3e129233c941d169734fd8f871ba63a0e827455ad4d"
    assert stage.part_fingerprint("queries") is None


def test_relation_filters_add_their_stage_and_column():
    """`neighbour_positive` adds the query_neighbours stage (read by the filter); `pseudo_relevance`
    asks the candidates stage for `top_similarity`. Without them neither is in the plan."""
    filters = [{"type": "neighbour_positive", "k": 4}, {"type": "pseudo_relevance", "value": 90, "top": 5}]
    config = MineConfig(beir=ROOT / "examples/cranfield", out="o", filters=filters)
    nodes = {n.name: n for n in mine_plan(config, CPU)}
    assert nodes["query_neighbours"].inputs == {"queries": "embed_queries"}
    assert nodes["filter"].inputs == {"scored": "candidates", "neighbours": "query_neighbours"}
    assert nodes["query_neighbours"].build({}).k == 4
    plain = {n.name: n for n in mine_plan(MineConfig(beir=ROOT / "examples/cranfield", out="o"), CPU)}
    assert "query_neighbours" not in plain and "neighbours" not in plain["filter"].inputs
