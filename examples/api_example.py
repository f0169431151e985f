"""The README's "Python API" example, runnable as is from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python examples/api_example.py

tests/test_api.py runs the README's block (on a small Cranfield subset) and checks that this
file holds the same code."""

from hardneg import mine

# Same keys as the command line and the YAML config; returns a datasets.Dataset.
dataset = mine(beir="examples/cranfield", out="out/cranfield-api", positives="best", num_negatives=5,
               miners=["dense", "bm25"], runner="local")  # runner="local": in-process, no Ray
print(dataset)
train = dataset.select_columns(["query", "positive"] + [f"negative_{i}" for i in range(1, 6)])
print(train[0]["query"], "->", train[0]["negative_1"][:80])
