"""A sentence-transformers model run by OpenVINO on the CPU, without torch at run time.

On CPUs with AMX or avx512_bf16, OpenVINO's bf16 kernels embed Cranfield's abstracts with
all-MiniLM-L6-v2 1.4x faster than torch's bf16 autocast (10.1 s vs 14.2 s, 2 cores, quiet), at a
cosine to torch fp32 as close as autocast's (both >= 0.9999; `benchmarks/RESULTS.md`).

The model is converted once (its transformer traced to OpenVINO's format, which takes seconds and
needs torch) into a cache folder (`HARDNEG_CACHE`, else `$XDG_CACHE_HOME/hardneg`, else
`~/.cache/hardneg`) under a key of everything the conversion depends on: the model's files and
the library versions. Beside the converted transformer the entry keeps the model's tokenizer (the
`tokenizers` object its Hugging Face tokenizer wraps) and its pooling, so a later process embeds
with `openvino`, `tokenizers` and numpy alone: importing torch and sentence-transformers costs
more CPU-seconds (about 4 s) than embedding a small corpus. That standalone path is taken only
when the conversion checked it against the loaded model (the same token ids on probe texts, the
same vectors from the model's own pooling modules); any other model (another pooling mode, a
Dense layer, a tokenizer with no `tokenizers` backend) keeps its own modules in torch after the
OpenVINO transformer. Entries are written atomically; a damaged entry is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hardneg.stages.engines.tokens import pad_features, padding_of

_FORMAT = 2  # 2: tokenizer and pooling kept beside the transformer (the standalone path)
# Pooling modes computed here in numpy, as sentence-transformers' Pooling module computes them.
_POOLING = ("mean", "cls", "max")
# Texts the conversion tokenizes both ways before it trusts the standalone tokenizer.
_PROBES = ["hardneg", "", "  Leading and trailing spaces  ", "Café naïve résumé — “quotes” ½ ∑ 東京 🙂",
           "UPPER case, punctuation!? (brackets) [and] numbers 3.14159 e=mc^2",
           "a long text that is cut at the length limit " * 40]


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def cache_root() -> Path:
    if os.environ.get("HARDNEG_CACHE"):
        return Path(os.environ["HARDNEG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hardneg"


def open_encoder(model_key: dict, precision: str, threads: int, load: Callable[[], Any]) -> "OpenVINOEncoder":
    """The encoder for a model, converting it into the cache first if needed. `load` returns the
    sentence-transformers model; it is called only to convert, or for a model whose pooling must
    stay in torch."""
    folder = cache_root() / "openvino" / _key(model_key)
    model = None
    if not _complete(folder):
        model = load()
        _write_entry(model, folder)
    meta = json.loads((folder / "meta.json").read_text())
    if not meta["standalone"] and model is None:
        model = load()
    return OpenVINOEncoder(folder, meta, precision, threads, None if meta["standalone"] else model)


class OpenVINOEncoder:
    """Texts to token ids, and padded ids to normalised float32 vectors."""

    def __init__(self, folder: Path, meta: dict, precision: str, threads: int, model=None) -> None:
        import openvino as ov

        self.dim = int(meta["dim"])
        self.max_seq_length = int(meta["max_seq_length"])
        self.input_names = list(meta["inputs"])
        self.pad_values = dict(meta["pad"])
        self.left_padding = meta["padding_side"] == "left"
        compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            # A fixed thread count and one stream: the same arithmetic whichever runner hosts it.
            "INFERENCE_NUM_THREADS": max(1, int(threads)),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        })
        self._output = compiled.output(0)  # last_hidden_state
        self._request = compiled.create_infer_request()
        self._model = model  # set only when the model's own modules pool (in torch)
        self._pooling = meta.get("pooling")
        self._truncation_side = meta["truncation_side"]
        self._tokenizer = None if model is not None else _standalone_tokenizer(folder)
        self._max_len = None

    def tokenize(self, texts: list[str], max_len: int) -> dict[str, list[list[int]]]:
        if self._model is not None:
            return dict(self._model.tokenizer(texts, truncation=True, max_length=max_len))
        if self._max_len != max_len:  # as the Hugging Face tokenizer sets it for each call
            self._tokenizer.enable_truncation(max_len, stride=0, strategy="longest_first", direction=self._truncation_side)
            self._max_len = max_len
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
        return {name: [getattr(e, fields[name]) for e in encodings] for name in self.input_names}

    def hidden(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Token embeddings [rows, tokens, dim], float32."""
        hidden = self._request.infer({name: features[name] for name in self.input_names})[self._output]
        return hidden.astype(np.float32, copy=False)

    def forward(self, features: dict[str, np.ndarray]) -> np.ndarray:
        hidden = self.hidden(features)
        if self._model is None:
            return _normalize(_pool(self._pooling, hidden, features["attention_mask"]))
        return _torch_pool(self._model, features, hidden)


def _pool(mode: str, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling for one mode, in float32."""
    if mode == "cls":
        return hidden[np.arange(len(hidden)), mask.argmax(axis=1)]
    if mode == "max":
        return np.where(mask[:, :, None] > 0, hidden, -np.inf).max(axis=1).astype(np.float32)
    weights = mask.astype(np.float32)
    # A batched matrix product over the tokens (BLAS), not a [rows, tokens, dim] temporary.
    sums = np.matmul(weights[:, None, :], hidden)[:, 0, :]
    return sums / np.maximum(weights.sum(axis=1, keepdims=True), np.float32(1e-9))


def _normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


def _torch_pool(model, features: dict[str, np.ndarray], hidden: np.ndarray) -> np.ndarray:
    """The model's own modules after its transformer (pooling, dense layers, ...), in torch."""
    import torch

    with torch.inference_mode():
        state = {name: torch.from_numpy(values) for name, values in features.items()}
        state["token_embeddings"] = torch.from_numpy(hidden)
        for module in list(model)[1:]:
            state = module(state)
        return torch.nn.functional.normalize(state["sentence_embedding"].float(), dim=-1).numpy()


def _standalone_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    return tokenizer


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def _key(model_key: dict) -> str:
    # Versions from package metadata: reading them imports nothing.
    libraries = {name: _version(name) for name in ("openvino", "torch", "transformers", "sentence-transformers", "tokenizers")}
    parts = {"model": model_key, **libraries, "format": _FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("model.xml", "model.bin", "meta.json", "done"))


def _write_entry(model, folder: Path) -> None:
    """Convert `model` into the cache entry `folder`, atomically (a temporary folder renamed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        input_names = list(model.tokenizer("hardneg").keys())  # the features the transformer is fed
        _convert(model[0].auto_model, input_names, tmp / "model.xml")
        meta = _describe(model, input_names)
        backend = getattr(model.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            (tmp / "tokenizer.json").write_text(backend.to_str())
        meta["standalone"] = (backend is not None and meta["pooling"] in _POOLING and "attention_mask" in input_names
                              and _standalone_matches(model, tmp, meta))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        (tmp / "done").write_text("ok\n")
        if _complete(folder):  # another worker finished the same conversion meanwhile
            return
        shutil.rmtree(folder, ignore_errors=True)  # an entry without its marker: a crash mid-write
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same conversion first: use theirs
            if not _complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _describe(model, input_names: list[str]) -> dict:
    tokenizer = model.tokenizer
    pad, left = padding_of(tokenizer)
    modules = list(model)
    pooling = None
    rest = [type(m).__name__ for m in modules[1:]]
    # Poolable here: one Pooling module with one mode, then at most a Normalize (every vector is
    # normalised anyway).
    if rest in (["Pooling"], ["Pooling", "Normalize"]) and isinstance(getattr(modules[1], "pooling_mode", None), str):
        pooling = modules[1].pooling_mode
    return {
        "inputs": input_names,
        "dim": int(model.get_embedding_dimension()),
        "max_seq_length": int(model.max_seq_length or tokenizer.model_max_length),
        "pad": pad,
        "padding_side": "left" if left else "right",
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "pooling": pooling,
    }


def _standalone_matches(model, folder: Path, meta: dict) -> bool:
    """The standalone tokenizer gives the Hugging Face tokenizer's ids, and numpy pooling the
    model's own modules' vectors (to float32 rounding), on the probe texts."""
    meta = {**meta, "standalone": True}
    standalone = OpenVINOEncoder(folder, meta, "fp32", 1)
    with_model = OpenVINOEncoder(folder, meta, "fp32", 1, model)
    for max_len in (8, meta["max_seq_length"]):  # the last: the ids the vectors are compared on
        ids = standalone.tokenize(_PROBES, max_len)
        if ids != {name: list(map(list, values)) for name, values in with_model.tokenize(_PROBES, max_len).items()}:
            return False
    features = pad_features(ids, range(len(_PROBES)), max(len(row) for row in ids["input_ids"]), standalone.pad_values)
    return bool(np.allclose(standalone.forward(features), with_model.forward(features), atol=1e-6))


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
            converted = ov.convert_model(transformer.eval(), example_input=example)
    finally:
        hf_logging.set_verbosity(verbosity)
    ov.save_model(converted, str(target), compress_to_fp16=False)
