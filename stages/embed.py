"""Embed texts with a sentence-transformers model: one row in, one normalised vector out.

Rows are grouped by token length and each group is padded to a fixed bucket length (a multiple
of 8 tokens). Two things follow: little padding is wasted, and a text's vector depends only on
the text, its bucket and the input block it came in (every runner cuts the input into the same
blocks), never on the order of the rows — so the output is bit-identical in-process, on Ray and
on a cluster. With OpenVINO and with torch's bf16 kernels it does not even depend on the block;
torch's fp32 kernels on some CPUs (AVX512) round a row differently with the number of rows
beside it, in the last bits.

Engines: torch (`TorchEncoder`), or OpenVINO on CPUs with native bf16 (`engines/openvino.py`), which
embeds without importing torch once the model is converted.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import pyarrow as pa

from hardneg.stages.base import MapStage, Resources, local_cpus
from hardneg.stages.engines.tokens import pad_features, padding_of
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
            # OpenVINO's kernels round differently from torch's (a torch run keeps its old key);
            # format 2: pooled in numpy (engines/openvino.py).
            **({"backend": self.backend, "engine_format": 2} if self.backend == "openvino" else {}),
        }

    def pool_key(self) -> tuple:
        # Everything the loaded model depends on: stages with the same key share workers.
        return ("embed", self.model, self.device, self.precision, self.backend, int(self.threads), self.trust_remote_code)

    def setup(self) -> None:
        key = (resolve_model(self.model), self.device, self.precision, self.backend, self.threads, self.trust_remote_code)
        if key not in _MODELS:
            _MODELS.clear()  # one model per process at a time: a worker moving on frees the last
            _MODELS[key] = self._open_openvino() if self.backend == "openvino" else TorchEncoder(self._load(), self)
        self._encoder = _MODELS[key]

    def _open_openvino(self):
        from hardneg.stages.engines.openvino import open_encoder

        from hardneg.stages.models import ModelLoadError

        def load():
            model = self._load()
            if not len(model) or getattr(model[0], "auto_model", None) is None:
                raise ModelLoadError(f"embedding model {self.model!r}: its first module is not a Hugging Face "
                                     "transformer, which the OpenVINO engine needs; set embed_backend: torch")
            return model

        try:
            return open_encoder(model_fingerprint(self.model), self.precision, self.threads, load)
        except ModelLoadError:
            raise
        except Exception as err:  # noqa: BLE001 - a model OpenVINO cannot trace: one line, and the way out
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise ModelLoadError(f"embedding model {self.model!r}: OpenVINO cannot convert it ({err.__class__.__name__}: "
                                 f"{first}); set embed_backend: torch") from None

    def _load(self):
        from sentence_transformers import SentenceTransformer

        if not self.device.startswith("cuda"):
            import torch

            # Fixed thread count: the same arithmetic whichever runner hosts this worker.
            torch.set_num_threads(max(1, int(self.threads)))
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

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised float32 vectors for `texts`, in order."""
        encoder = self._encoder
        # The stage's own limit, never written into the shared model (another stage may differ).
        max_len = int(self.max_seq_length or encoder.max_seq_length)
        if self.prompt:
            texts = [self.prompt + t for t in texts]
        if not texts:
            return np.empty((0, encoder.dim), dtype=np.float32)
        # A text that occurs twice is embedded once (its vector depends on the text alone).
        unique, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
        # Tokenised once: the batches below are padded from these ids, not tokenised again.
        encoded = encoder.tokenize(list(unique), max_len)
        lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(unique))
        buckets = np.minimum(max_len, -(-lengths // _BUCKET) * _BUCKET)
        order = np.lexsort((np.arange(len(unique)), buckets))
        out = np.empty((len(unique), encoder.dim), dtype=np.float32)
        # Rows per forward pass by token budget: short texts go many at a time, long ones
        # `micro_batch_size` at a time.
        budget = self.micro_batch_size * _BUDGET_TOKENS
        start = 0
        while start < len(order):
            bucket = int(buckets[order[start]])
            limit = max(self.micro_batch_size, budget // bucket)
            stop = start + int(np.searchsorted(buckets[order[start:start + limit]], bucket, side="right"))
            rows = order[start:stop]
            out[rows] = encoder.forward(pad_features(encoded, rows, bucket, encoder.pad_values, encoder.left_padding))
            start = stop
        return out[inverse.reshape(-1)]

    def transform(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        vectors = self.encode(texts)
        dim = vectors.shape[1]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        if self.keep_columns:
            return batch.append_column("embedding", embedding)
        return pa.table({"id": batch.column(self.id_column), "embedding": embedding})


class TorchEncoder:
    """A sentence-transformers model run by torch: the reference engine, and the one for GPUs."""

    def __init__(self, model, stage: EmbedStage) -> None:
        import torch

        self.model = model
        self._torch = torch
        self._device = stage.device
        self._precision = stage.precision
        tokenizer = model.tokenizer
        self.dim = model.get_embedding_dimension()
        self.max_seq_length = int(model.max_seq_length or tokenizer.model_max_length)
        self.pad_values, self.left_padding = padding_of(tokenizer)

    def tokenize(self, texts: list[str], max_len: int) -> dict[str, list[list[int]]]:
        return dict(self.model.tokenizer(texts, truncation=True, max_length=max_len))

    def forward(self, features: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        tensors = {key: torch.from_numpy(values).to(self._device) for key, values in features.items()}
        with torch.inference_mode(), _autocast(torch, self._precision, self._device):
            vectors = self.model(tensors)["sentence_embedding"]
        return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()


def _autocast(torch, precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)
    if precision == "fp16" and not device.startswith("cuda"):
        return torch.autocast("cpu", dtype=torch.float16)
    return nullcontext()


def default_threads() -> int:
    return max(1, min(4, local_cpus()))
