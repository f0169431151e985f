"""Engines the stages use, with no stage logic: FAISS (faiss_index), BM25 (bm25), OpenVINO
embedding (openvino) and the token padding both embedding engines share (tokens)."""

import importlib.util
import sys


def lazy_module(name: str):
    """`name`, imported on first attribute access (importlib's LazyLoader): a run that only
    validates its config or reuses a cached index never pays for importing the library."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
