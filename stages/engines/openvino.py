"""The transformer of a sentence-transformers model, run by OpenVINO on the CPU.

On CPUs with AMX or avx512_bf16, OpenVINO's bf16 kernels embed Cranfield's abstracts with
all-MiniLM-L6-v2 1.4x faster than torch's bf16 autocast (10.1 s vs 14.2 s, 2 cores, quiet), at a
cosine to torch fp32 as close as autocast's (both >= 0.9999; `benchmarks/RESULTS.md`). Only the transformer moves: the model's own Pooling and Normalize
modules still run in torch on its token embeddings, so any sentence-transformers model whose
first module is a Hugging Face transformer works unchanged.

Converting a model (tracing it) takes seconds, so the converted model is kept in a cache folder
(`HARDNEG_CACHE`, else `$XDG_CACHE_HOME/hardneg`, else `~/.cache/hardneg`) under a key of
everything the conversion depends on: the model's files, its input names and the library
versions. It is written atomically; a damaged entry is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cache_root() -> Path:
    if os.environ.get("HARDNEG_CACHE"):
        return Path(os.environ["HARDNEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hardneg"


class OpenVINOTransformer:
    """Token embeddings [rows, tokens, dim] for padded features, from the converted transformer."""

    def __init__(self, transformer, model_key: dict, input_names: list[str], precision: str, threads: int) -> None:
        import openvino as ov

        self.input_names = list(input_names)
        path = _converted(transformer, model_key, self.input_names)
        compiled = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            # A fixed thread count and one stream: the same arithmetic whichever runner hosts it.
            "INFERENCE_NUM_THREADS": max(1, int(threads)),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        })
        self._output = compiled.output(0)  # last_hidden_state
        self._request = compiled.create_infer_request()

    def __call__(self, features: dict[str, Any]):
        import torch

        inputs = {name: features[name].numpy() for name in self.input_names}
        hidden = self._request.infer(inputs)[self._output]
        return torch.from_numpy(hidden.astype("float32", copy=False))


def _key(model_key: dict, input_names: list[str]) -> str:
    import openvino
    import torch
    import transformers

    parts = {"model": model_key, "inputs": sorted(input_names), "openvino": openvino.__version__,
             "torch": torch.__version__, "transformers": transformers.__version__, "format": 1}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _converted(transformer, model_key: dict, input_names: list[str]) -> Path:
    """The cached OpenVINO model file for `transformer`, converting it first if needed."""
    folder = cache_root() / "openvino" / _key(model_key, input_names)
    target = folder / "model.xml"
    if target.is_file() and (folder / "model.bin").is_file() and (folder / "done").is_file():
        return target
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        _convert(transformer, input_names, tmp / "model.xml")
        (tmp / "done").write_text("ok\n")
        if (folder / "done").is_file():  # another worker finished the same conversion meanwhile
            return target
        shutil.rmtree(folder, ignore_errors=True)  # an entry without its marker: a crash mid-write
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same conversion first: use theirs
            if not (folder / "done").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(transformer, input_names: list[str], target: Path) -> None:
    import openvino as ov
    import torch
    from transformers.utils import logging as hf_logging

    # Rows and tokens stay dynamic in the converted model; this only drives the trace.
    example = {name: torch.ones((2, 16), dtype=torch.int64) for name in input_names}
    if "token_type_ids" in example:
        example["token_type_ids"] = torch.zeros((2, 16), dtype=torch.int64)
    if "attention_mask" in example:
        # One padded row: a trace of an all-ones mask may take transformers' "no mask needed"
        # shortcut and bake it in, letting padding be attended to.
        example["attention_mask"][1, 10:] = 0
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shapes a trace fixes: not the user's
            model = ov.convert_model(transformer.eval(), example_input=example)
    finally:
        hf_logging.set_verbosity(verbosity)
    ov.save_model(model, str(target), compress_to_fp16=False)
