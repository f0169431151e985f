"""The installed package (issue: one public package name): a wheel of this checkout holds
`hardneg` and nothing else at the top level, and a fresh environment with it imports
`hardneg` (with its version) but not `pipeline`, `stages` or `schemas`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(out), str(ROOT)], check=True, cwd=out)
    (found,) = out.glob("hardneg-*.whl")
    return found


def test_wheel_installs_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"hardneg"}
    for module in ("hardneg/__init__.py", "hardneg/pipeline/cli.py", "hardneg/stages/embed.py",
                   "hardneg/schemas/__init__.py", "hardneg/pipeline/plan.py", "hardneg/pipeline/executors/ray.py",
                   "hardneg/pipeline/outputs/evaluate.py", "hardneg/stages/engines/bm25.py",
                   "hardneg/stages/engines/faiss_index.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hardneg = hardneg.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_hardneg_only(wheel, tmp_path):
    # The wheel unpacked as its own site dir, outside the checkout: what `pip install .` gives
    # (the dependencies come from this environment, the package from the wheel alone).
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); import hardneg; "
            "assert hardneg.__file__.startswith(sys.argv[1]), hardneg.__file__; "
            "import hardneg.pipeline.cli, hardneg.stages.embed, hardneg.pipeline.executors.local, "
            "hardneg.pipeline.outputs.report, hardneg.stages.engines.faiss_index; "
            "print(hardneg.__version__, [n for n in ('pipeline', 'stages', 'schemas') if importlib.util.find_spec(n)])")
    proc = subprocess.run([sys.executable, "-I", "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    version, leaked = proc.stdout.split(" ", 1)
    assert version == "0.1.0" or version[0].isdigit()
    assert leaked.strip() == "[]"
