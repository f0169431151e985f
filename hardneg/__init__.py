"""hardneg: hard-negative mining and dataset curation for embedding, retrieval and reranker training.

    import hardneg
    dataset = hardneg.mine(beir="examples/cranfield", out="out/cranfield", positives="best", num_negatives=5)
    triplets = hardneg.mine_hard_negatives(pairs, model)  # sentence-transformers' function and arguments

The repository keeps the design's top-level folders (`pipeline/`, `stages/`, `schemas/`); they
install as `hardneg.pipeline`, `hardneg.stages` and `hardneg.schemas`, so nothing generic lands at
the top level of a user's environment.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from pathlib import Path as _Path

# In a source checkout (the repo root as the working directory, or as a Ray job's working_dir)
# this folder shadows the installed package and its subpackages sit beside it, not in it: look
# there too. Only where the folder is a checkout (pyproject.toml and the three folders beside it),
# so an installed hardneg never sees its neighbours in site-packages.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and all((_checkout / name / "__init__.py").is_file()
                                                      for name in ("pipeline", "stages", "schemas")):
    __path__.append(str(_checkout))  # type: ignore[name-defined]  # noqa: F821

try:
    __version__ = _metadata.version("hardneg")
except _metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0.0.0+unknown"

from hardneg.pipeline.api import mine, run_mine  # noqa: E402
from hardneg.pipeline.config import MineConfig  # noqa: E402

# Loaded on first use, so `import hardneg` stays light.
_LAZY = {
    "mine_hard_negatives": ("hardneg.pipeline.st_compat", "mine_hard_negatives"),  # sentence-transformers' drop-in
    "evaluate": ("hardneg.pipeline.outputs.evaluate", "evaluate"),  # `hardneg eval` as a function
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hardneg' has no attribute {name!r}")


__all__ = ["MineConfig", "__version__", "evaluate", "mine", "mine_hard_negatives", "run_mine"]
