"""Embed texts with a sentence-transformers model: one row in, one normalised vector out.

Rows are grouped by token length and each group is padded to a fixed bucket length (a multiple
of 8 tokens). Two things follow: little padding is wasted, and a text's vector depends only on
the text, its bucket and the input block it came in (every runner cuts the input into the same
blocks), never on the order of the rows — so the output is bit-identical in-process, on Ray and
on a cluster. With OpenVINO and with torch's bf16 kernels it does not even depend on the block;
torch's fp32 kernels on some CPUs (AVX512) round a row differently with the number of rows
beside it, in the last bits.

Engines: torch, or OpenVINO for the transformer on CPUs with native bf16 (`engines/openvino.py`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import numpy as np
import pyarrow as pa

from hardneg.stages.base import MapStage, Resources
from hardneg.stages.models import model_fingerprint, resolve_model

# Bucket width in tokens: 8 pads ~1.6% over the real tokens of Cranfield's abstracts (16: 3.1%;
# a batch padded to its longest text, sorted by characters as sentence-transformers does: 10.6%).
_BUCKET = 8
# Token budget of a forward pass, per row of `micro_batch_size` (see encode).
_BUDGET_TOKENS = 64

# Loaded models by what loading depends on: stages that share a model in one worker process
# (queries and corpus, in-process or on one Ray actor) load it once.
_MODELS: dict[tuple, Any] = {}


class EmbedStage(MapStage):
    name = "embed"
    version = "2"  # 2: 8-token buckets (vectors differ from version 1's in the last bits)
    stateful = True

    def __init__(
        self,
        *,
        model: str,
        id_column: str,
        text_column: str,
        prompt: str | None = None,
        max_seq_length: int | None = None,
        precision: str = "fp32",
        device: str = "cpu",
        backend: str = "torch",
        micro_batch_size: int = 32,
        threads: int = 1,
        keep_columns: bool = False,
        trust_remote_code: bool = False,
        batch_size: int = 256,  # rows per task: the progress bar moves once a batch
        max_workers: int | None = None,
        label: str = "embed",
    ) -> None:
        super().__init__()
        self.model = model
        self.id_column = id_column
        self.text_column = text_column
        self.prompt = prompt
        self.max_seq_length = max_seq_length
        self.precision = precision
        self.device = device
        self.backend = backend
        self.micro_batch_size = micro_batch_size
        self.threads = threads
        self.keep_columns = keep_columns
        self.trust_remote_code = trust_remote_code
        self.name = label
        self.resources = Resources(
            num_cpus=threads,
            num_gpus=1.0 if device.startswith("cuda") else 0.0,
            batch_size=batch_size,
            max_workers=max_workers,
        )

    def fingerprint_config(self) -> dict[str, Any]:
        # Batch sizes and thread counts do not change the vectors (see the module docstring).
        return {
            **model_fingerprint(self.model),
            "prompt": self.prompt,
            "max_seq_length": self.max_seq_length,
            "precision": self.precision,
            "pooling": "model",  # the model's own Pooling/Normalize modules, part of its files
            "id_column": self.id_column,
            "text_column": self.text_column,
            "keep_columns": self.keep_columns,
            "normalize": True,
            # OpenVINO's kernels round differently from torch's (a torch run keeps its old key).
            **({"backend": self.backend} if self.backend != "torch" else {}),
        }

    def pool_key(self) -> tuple:
        # Everything the loaded model depends on: stages with the same key share workers.
        return ("embed", self.model, self.device, self.precision, self.backend, int(self.threads), self.trust_remote_code)

    def setup(self) -> None:
        import torch

        if not self.device.startswith("cuda"):
            # Fixed thread count: the same arithmetic whichever runner hosts this worker.
            torch.set_num_threads(max(1, int(self.threads)))
        self._torch = torch
        key = (resolve_model(self.model), self.device, self.precision, self.backend, self.trust_remote_code)
        if key not in _MODELS:
            _MODELS.clear()  # one model per process at a time: a worker moving on frees the last
            model = self._load()
            _MODELS[key] = (model, self._openvino(model) if self.backend == "openvino" else None)
        self._model, self._transformer = _MODELS[key]

    def _openvino(self, model):
        from hardneg.stages.engines.openvino import OpenVINOTransformer

        from hardneg.stages.models import ModelLoadError

        transformer = getattr(model[0], "auto_model", None) if len(model) else None
        if transformer is None:
            raise ModelLoadError(f"embedding model {self.model!r}: its first module is not a Hugging Face "
                                 "transformer, which the OpenVINO engine needs; set embed_backend: torch")
        names = list(model.tokenizer("hardneg").keys())  # the features the transformer is fed
        try:
            return OpenVINOTransformer(transformer, model_fingerprint(self.model), names, self.precision, self.threads)
        except Exception as err:  # noqa: BLE001 - a model OpenVINO cannot trace: one line, and the way out
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise ModelLoadError(f"embedding model {self.model!r}: OpenVINO cannot convert it ({err.__class__.__name__}: "
                                 f"{first}); set embed_backend: torch") from None

    def _load(self):
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(
                resolve_model(self.model),
                device=self.device,
                trust_remote_code=self.trust_remote_code,
            )
        except Exception as err:  # noqa: BLE001 - any failure to load is the model's: one line, exit 2
            from hardneg.stages.models import ModelLoadError

            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise ModelLoadError(f"embedding model {self.model!r} cannot be loaded: {err.__class__.__name__}: {first}") from None
        model.eval()
        if self.precision == "fp16" and self.device.startswith("cuda"):
            model.half()
        return model

    def _autocast(self):
        torch = self._torch
        if self.precision == "bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            return torch.autocast("cpu", dtype=torch.float16)
        return nullcontext()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised float32 vectors for `texts`, in order."""
        tokenizer = self._model.tokenizer
        # The stage's own limit, never written into the shared model (another stage may differ).
        max_len = int(self.max_seq_length or self._model.max_seq_length or tokenizer.model_max_length)
        if self.prompt:
            texts = [self.prompt + t for t in texts]
        if not texts:
            return np.empty((0, self._model.get_embedding_dimension()), dtype=np.float32)
        # A text that occurs twice is embedded once (its vector depends on the text alone).
        unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
        # Tokenised once: the batches below are padded from these ids, not tokenised again.
        encoded = tokenizer(list(unique), truncation=True, max_length=max_len)
        lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(unique))
        buckets = np.minimum(max_len, -(-lengths // _BUCKET) * _BUCKET)
        order = np.lexsort((np.arange(len(unique)), buckets))
        out = np.empty((len(unique), self._model.get_embedding_dimension()), dtype=np.float32)
        # Rows per forward pass by token budget: short texts go many at a time, long ones
        # `micro_batch_size` at a time.
        budget = self.micro_batch_size * _BUDGET_TOKENS
        start = 0
        while start < len(order):
            bucket = int(buckets[order[start]])
            limit = max(self.micro_batch_size, budget // bucket)
            stop = start + int(np.searchsorted(buckets[order[start:start + limit]], bucket, side="right"))
            rows = order[start:stop]
            out[rows] = self._forward(self._pad(encoded, rows, bucket))
            start = stop
        return out[inverse.reshape(-1)]

    def _pad(self, encoded, rows: np.ndarray, length: int) -> dict:
        """The tensors `tokenizer(texts, padding="max_length", max_length=length)` returns for
        these rows (each at most `length` tokens), built from their ids."""
        torch = self._torch
        tokenizer = self._model.tokenizer
        pad = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
               "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
        left = getattr(tokenizer, "padding_side", "right") == "left"
        features = {}
        for key, values in encoded.items():
            array = np.full((len(rows), length), pad.get(key, 0), dtype=np.int64)
            for i, row in enumerate(rows):
                ids = values[row]
                if left:
                    array[i, length - len(ids):] = ids
                else:
                    array[i, :len(ids)] = ids
            features[key] = torch.from_numpy(array).to(self.device)
        return features

    def _forward(self, features: dict) -> np.ndarray:
        torch = self._torch
        if self._transformer is not None:
            # OpenVINO runs the transformer; the model's own pooling modules do the rest.
            with torch.inference_mode():
                features["token_embeddings"] = self._transformer(features)
                for module in list(self._model)[1:]:
                    features = module(features)
            return torch.nn.functional.normalize(features["sentence_embedding"].float(), dim=-1).numpy()
        with torch.inference_mode(), self._autocast():
            vectors = self._model(features)["sentence_embedding"]
        return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()

    def transform(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        vectors = self.encode(texts)
        dim = vectors.shape[1]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        if self.keep_columns:
            return batch.append_column("embedding", embedding)
        return pa.table({"id": batch.column(self.id_column), "embedding": embedding})


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))
