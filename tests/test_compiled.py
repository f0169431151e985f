"""The numba kernels still compile where numba's on-disk cache cannot be written (a read-only
install run by a user without a home directory, as in the Docker images)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KERNEL = """
{decorator}
def add_one(x):
    return x + 1

print(add_one(41))
"""


def _run(tmp_path: Path, decorator: str) -> subprocess.CompletedProcess:
    module = tmp_path / "module"
    module.mkdir(exist_ok=True)
    (module / "__pycache__").write_text("")  # a file: numba cannot make its cache folder beside the source
    no_home = tmp_path / "no-home"
    no_home.write_text("")  # a file: no cache folder can be made under it either
    (module / "kernel.py").write_text(KERNEL.format(decorator=decorator))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(HOME=str(no_home), XDG_CACHE_HOME=str(no_home), PYTHONPATH=f"{module}{os.pathsep}{ROOT}")
    return subprocess.run([sys.executable, "-c", "import kernel"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_kernels_compile_without_a_writable_cache(tmp_path):
    # numba's own cached njit fails there at import: what the fallback is for.
    plain = _run(tmp_path, "import numba\n@numba.njit(cache=True)")
    assert plain.returncode != 0 and "no locator available" in plain.stderr
    ours = _run(tmp_path, "from hardneg.stages.engines.compiled import njit\n@njit")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip() == "42"
