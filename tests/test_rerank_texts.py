"""The rerank stage reads only the texts a batch scores: `CorpusTexts` holds the corpus's ids and
where each lives, and a lookup returns exactly the asked texts."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import CRANFIELD, read_jsonl
from hardneg.stages.io import ShardWriter
from hardneg.stages.rerank import CorpusTexts


@pytest.mark.parametrize("shards", ["arrow", "parquet"])
def test_lookup_returns_the_asked_texts_across_files_and_row_groups(tmp_path, shards):
    docs = read_jsonl(CRANFIELD / "corpus.jsonl")[:300]
    for f, part in enumerate((docs[:170], docs[170:])):  # two shards, groups of 25 rows
        table = pa.table({"doc_id": [d["_id"] for d in part], "text": [d["text"] for d in part]})
        if shards == "parquet":
            pq.write_table(table, tmp_path / f"part-{f:05d}.parquet", row_group_size=25)
        else:  # the work dir's own shards: a record batch per write
            with ShardWriter(tmp_path, prefix=f"part{f}") as writer:
                for start in range(0, table.num_rows, 25):
                    writer.write(table.slice(start, 25))
    texts = CorpusTexts(tmp_path)
    assert texts._where.shape == (300, 3)  # ids and places only: no text is held
    asked = [docs[i]["_id"] for i in (299, 0, 171, 24, 25, 0, 150)]
    found = texts.lookup(asked)
    assert found == {docs[i]["_id"]: docs[i]["text"] for i in (299, 0, 171, 24, 25, 150)}
    with pytest.raises(KeyError, match="not in the corpus"):
        texts.lookup([docs[3]["_id"], "no-such-document"])
