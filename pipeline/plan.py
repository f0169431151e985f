"""The stage graph of a run, declared once.

A plan is an ordered list of nodes. Each node names its stage's inputs once, as
`{input name: node}` or `{input name: "node/part"}` (a subfolder of that node's output, such as
ingest's `corpus`). The runner derives everything else from this declaration alone:

- a stage's fingerprint chains the fingerprints of its inputs, in declaration order, except the
  inputs listed in `covered` (read, but their identity is already inside another input's
  fingerprint: declaring them keeps the graph honest without changing what a cached output is);
- the folders each stage reads (given to `build`, which makes the stage);
- the rows a map stage streams (`rows`), and where it runs (`MapStage.stateful` / `in_process`);
- the order: a node comes after every node it reads.

Adding a stage means writing its module and one `Node(...)` line below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hardneg.pipeline.config import ConfigError, MineConfig
from hardneg.stages.base import Stage, StageResult

Inputs = dict[str, Path]


@dataclass(frozen=True)
class Node:
    name: str  # the stage's name (its folder in the work dir); other nodes read it by this name
    build: Callable[[Inputs], Stage]  # the stage, given the folders of its inputs
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> "node" or "node/part"
    rows: str | None = None  # a map stage: the input it streams, batch by batch
    covered: tuple[str, ...] = ()  # inputs read whose identity another input's fingerprint holds
    # Run only when this says so, given the input folders (a node skipped is absent downstream).
    when: Callable[[Inputs], bool] | None = None
    check: Callable[[StageResult], None] | None = None  # after it ran or was reused
    final: bool = False  # written to the output folder (not the work dir)

    def sources(self) -> list[str]:
        return [ref.partition("/")[0] for ref in self.inputs.values()]

    def keyed_inputs(self) -> list[str]:
        return [name for name in self.inputs if name not in self.covered]


@dataclass(frozen=True)
class Machine:
    """What the runner decided about this machine (device, precision, threads): model stages
    are built with it."""

    device: str
    precision: str
    backend: str
    threads: int


def check_plan(nodes: list[Node]) -> None:
    """Every input names an earlier node, names are unique, a map stage's rows are an input."""
    seen: set[str] = set()
    for node in nodes:
        if node.name in seen:
            raise ValueError(f"plan: two nodes are named {node.name!r}")
        for source in node.sources():
            if source not in seen:
                raise ValueError(f"plan: {node.name} reads {source!r}, which is not an earlier node")
        if node.rows is not None and node.rows not in node.inputs:
            raise ValueError(f"plan: {node.name} streams {node.rows!r}, which is not one of its inputs")
        unknown = set(node.covered) - set(node.inputs)
        if unknown:
            raise ValueError(f"plan: {node.name} covers inputs it does not read: {sorted(unknown)}")
        seen.add(node.name)


def ancestors(nodes: list[Node], targets: list[str]) -> list[Node]:
    """The nodes the targets need (themselves included), in plan order."""
    by_name = {node.name: node for node in nodes}
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].sources())
    return [node for node in nodes if node.name in needed]


def _check_ingest(result: StageResult) -> None:
    # An empty corpus first: it is the cause when every judgement points at a missing document.
    if result.info.get("corpus_rows", 0) == 0:
        raise ConfigError("the corpus is empty: no document survived ingest")
    if result.info.get("pairs", 0) == 0:
        raise ConfigError("no usable pairs in the input (rejects by reason: "
                          + ", ".join(f"{k}={v}" for k, v in result.info.get("rejects", {}).items()) + ")")


def _vector_nodes(c: MineConfig, m: Machine) -> list[Node]:
    """Query and corpus vectors: embedded by the model, or read from files made elsewhere."""
    from hardneg.stages.embed import EmbedStage

    def embed(label: str, prompt: str | None, id_column: str, keep: bool) -> EmbedStage:
        return EmbedStage(
            model=c.model, id_column=id_column, text_column="text", prompt=prompt, max_seq_length=c.max_seq_length,
            precision=m.precision, device=m.device, backend=m.backend, micro_batch_size=c.embed_batch_size, threads=m.threads,
            keep_columns=keep, trust_remote_code=c.trust_remote_code, max_workers=c.workers, label=label,
        )

    if c.query_embeddings is not None:
        from hardneg.stages.precomputed import PrecomputedQueryVectors

        queries = Node("query_vectors", lambda i: PrecomputedQueryVectors(Path(c.query_embeddings)),
                       {"queries": "ingest/queries"}, rows="queries")
    else:
        queries = Node("embed_queries", lambda i: embed("embed_queries", c.query_prompt, "query_id", True),
                       {"queries": "ingest/queries"}, rows="queries")
    if c.corpus_embeddings is not None:
        from hardneg.stages.precomputed import PrecomputedEmbeddings

        corpus = Node("corpus_vectors", lambda i: PrecomputedEmbeddings(Path(c.corpus_embeddings)))
    else:
        corpus = Node("embed_corpus", lambda i: embed("embed_corpus", c.corpus_prompt, "doc_id", False),
                      {"corpus": "ingest/corpus"}, rows="corpus")
    return [queries, corpus]


def _build_index(c: MineConfig, inputs: Inputs):
    from hardneg.stages.index import IndexStage, embedding_dim

    if c.index.index != "auto":  # parsed at config time; now with the vectors' real size
        from hardneg.pipeline.config import check_factory_string

        check_factory_string(c.index.index, (embedding_dim(inputs["embeddings"]),))
    return IndexStage(c.index)


def index_plan(c: MineConfig, m: Machine) -> list[Node]:
    """Ingest, the vectors and the dense index: what `hardneg eval` and the benchmarks reuse."""
    from hardneg.stages.ingest import IngestStage

    queries, corpus = _vector_nodes(c, m)
    return [
        Node("ingest", lambda i: IngestStage(c.ingest_config()), check=_check_ingest),
        queries,
        corpus,
        Node("index", lambda i: _build_index(c, i), {"corpus": "ingest/corpus", "embeddings": corpus.name}),
    ]


def _filter_inputs(c: MineConfig, m: Machine, specs: list[dict], scored: str, bm25: dict[str, str],
                   queries: str) -> tuple[list[Node], str, dict[str, str]]:
    """The stages some filters read, when they are configured: the lexical scores (a map stage the
    filter then streams) and the query neighbours (a table beside it). Returns the nodes, the node
    the filter streams and the filter's further inputs."""
    from hardneg.stages.filters import neighbour_depth

    nodes: list[Node] = []
    extra: dict[str, str] = {}
    if any(spec["type"] == "lexical_duplicate" for spec in specs):
        from hardneg.stages.lexical import LexicalStage

        nodes.append(Node("lexical", lambda i: LexicalStage(
            bm25_dir=i["bm25"], bm25_config=c.bm25, corpus_dir=i["corpus"], rows_dir=i["scored"], max_workers=c.workers,
            threads=m.threads,
        ), {"scored": scored, **bm25, "corpus": "ingest/corpus"}, rows="scored", covered=("corpus",)))
        scored = "lexical"
    if neighbour_depth(specs):
        from hardneg.stages.query_neighbours import QueryNeighboursStage

        nodes.append(Node("query_neighbours", lambda i: QueryNeighboursStage(neighbour_depth(specs), c.index),
                          {"queries": queries}))
        extra["neighbours"] = "query_neighbours"
    return nodes, scored, extra


def mine_plan(c: MineConfig, m: Machine) -> list[Node]:
    """Every stage of `hardneg mine`, in the order they run."""
    from hardneg.stages.calibrate import CalibrateStage, calibrated_config, needs_calibration
    from hardneg.stages.candidates import CandidatesStage
    from hardneg.stages.filters import FilterStage, reads_bm25, similarity_top, specs_from_config
    from hardneg.stages.sample import SampleStage
    from hardneg.stages.write import WriteStage

    nodes = index_plan(c, m)
    queries = nodes[1].name
    chain = c.filter_chain()
    specs = specs_from_config(chain)
    # BM25 mines candidates (a miner) or only scores the dense ones (a filter reads bm25).
    score_bm25 = reads_bm25(chain)
    bm25 = {"bm25": "bm25_index"} if "bm25" in c.miners or score_bm25 else {}
    if bm25:
        from hardneg.stages.engines.bm25 import BM25IndexStage

        nodes.append(Node("bm25_index", lambda i: BM25IndexStage(c.bm25), {"corpus": "ingest/corpus"}))
    nodes.append(Node("calibrate", lambda i: CalibrateStage(c.index, k=c.range_max, seed=c.seed),
                      {"index": "index", "queries": queries}, when=lambda i: needs_calibration(c.index, i["index"])))
    nodes.append(Node("candidates", lambda i: CandidatesStage(
        miners=c.miners, range_max=c.range_max, rrf_k=c.rrf_k, index_dir=i["index"],
        index_config=calibrated_config(c.index, i["calibration"]) if "calibration" in i else c.index,
        bm25_dir=i.get("bm25"), bm25_config=c.bm25, threads=m.threads, max_workers=c.workers, score_bm25=score_bm25,
        similarity_top=similarity_top(specs),
    ), {"queries": queries, "index": "index", **bm25, "calibration": "calibrate"}, rows="queries"))
    scored = "candidates"
    if c.cross_encoder:
        from hardneg.stages.rerank import RerankStage

        scored = "rerank"
        nodes.append(Node("rerank", lambda i: RerankStage(
            model=c.cross_encoder, specs=specs, batch_size=c.ce_batch_size, max_length=c.ce_max_length,
            device=m.device, threads=m.threads, trust_remote_code=c.trust_remote_code, max_workers=c.workers,
            corpus_dir=i["corpus"],
        ), {"candidates": "candidates", "corpus": "ingest/corpus"}, rows="candidates", covered=("corpus",)))
    added, scored, extra = _filter_inputs(c, m, specs, scored, bm25, queries)
    nodes += added
    nodes.append(Node("filter", lambda i: FilterStage(
        specs, seed=c.seed, fit_input=i["scored"], false_negatives=c.false_negatives, threads=m.threads,
        neighbours_dir=i.get("neighbours"),
    ), {"scored": scored, **extra}, rows="scored"))
    nodes.append(Node("sample", lambda i: SampleStage(
        num_negatives=c.num_negatives, strategy=c.sampling_strategy, seed=c.seed, score=c.score,
        temperature=c.temperature, mmr_lambda=c.mmr_lambda, index_dir=i["index"],
        consistency_top_k=c.consistency_top_k, consistency_min_score=c.consistency_min_score,
        quotas=c.quotas, relabel=c.false_negatives == "relabel",
    ), {"filtered": "filter", "index": "index"}, rows="filtered", covered=("index",)))
    nodes.append(Node("write", lambda i: WriteStage(
        format=c.format, num_negatives=c.num_negatives, metadata_columns=c.metadata_columns, layout=c.layout,
        relabel=c.false_negatives == "relabel",
    ), {"pairs": "ingest/pairs", "filtered": "filter", "mined": "sample", "corpus": "ingest/corpus",
        "rejects": "ingest/rejects"}, covered=("corpus", "rejects"), final=True))
    check_plan(nodes)
    return nodes
