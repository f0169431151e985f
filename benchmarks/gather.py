"""What one scattered read of stored vectors costs (`VectorFile.take`, the candidates stage's
exact rescoring reads), each way it can be done, in two states of the kernel's page cache.

A .npy matrix of random float32 vectors is written through a memory map in chunks, as the index
stage writes `vectors.npy`; then each way gathers `--gathers` sets of `--rows` random sorted
rows (a 256-query candidates batch at a million documents reads about 50k):
- `mapped`: compiled, through the memory map, each block's pages released after it;
- `pread`: compiled, a pread(2) per row;
- `auto`: the default, whichever of the two has cost less per row so far on the file;
- `numpy`: the mapped gather done by numpy (what runs without numba).
The page-cache states: "as written" (as the index stage writes it), "read sequentially" (dropped
from the page cache, then read in order), and "reloaded page by page" (dropped, then read back
one random 4 KiB page at a time, as pages come back after memory pressure evicted them).

    python benchmarks/gather.py                      # 1M x 384: a 1.5 GB file in the temp dir
    python benchmarks/gather.py --docs 20000 --rows 2000 --gathers 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WAYS = ("mapped", "pread", "auto", "numpy")


def write_matrix(path: Path, n: int, dim: int, chunk: int = 100_000) -> None:
    """As the index stage's `write_vectors` does: through a memory map, a chunk at a time, each
    chunk's pages released from this process (they stay in the page cache)."""
    from hardneg.stages.io import release_pages

    rng = np.random.default_rng(0)
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, chunk):
        matrix[start:start + chunk] = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        release_pages(matrix)
    del matrix


def read_sequentially(path: Path) -> None:
    """The file dropped from the page cache and read back in order (the kernel reads ahead in
    large folios)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 1 << 24):
            pass
    finally:
        os.close(fd)


def reload_page_by_page(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: one page per read
        pages = os.fstat(fd).st_size // 4096 + 1
        for page in np.random.default_rng(1).permutation(pages).tolist():
            os.pread(fd, 1, page * 4096)
    finally:
        os.close(fd)


def time_way(path: Path, way: str, rows: int, gathers: int, seed: int) -> tuple[list[float], str]:
    from hardneg.stages import io

    compiled = io._compiled_gathers
    if way == "numpy":
        io._compiled_gathers = lambda: None
    try:
        vectors = io.VectorFile(path, gather="auto" if way == "numpy" else way)
        rng = np.random.default_rng(seed)
        out = np.empty((rows, vectors.shape[1]), np.float32)
        seconds = []
        for _ in range(gathers + 1):  # the first call compiles (or loads) the kernel: not counted
            wanted = np.unique(rng.integers(0, len(vectors), rows))
            started = time.perf_counter()
            vectors.take(wanted, out=out[:len(wanted)])
            seconds.append(time.perf_counter() - started)
        assert np.array_equal(out[:len(wanted)], np.load(path, mmap_mode="r")[wanted])
        return seconds[1:], f"(settled on {vectors._gather.best()})" if way == "auto" else ""
    finally:
        io._compiled_gathers = compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rows", type=int, default=51_200, help="random rows drawn per gather (repeats dropped)")
    parser.add_argument("--gathers", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hardneg-gather-") as tmp:
        path = Path(tmp) / "vectors.npy"
        write_matrix(path, args.docs, args.dim)
        print(f"{args.docs:,} x {args.dim} float32 ({path.stat().st_size / 1e9:.2f} GB), "
              f"{args.gathers} gathers of ~{args.rows:,} sorted rows each")
        print(f"{'page cache':<24}{'way':<8}{'median ms':>10}{'min ms':>8}{'max ms':>8}{'µs/row':>8}")
        for state, prepare in (("as written", None), ("read sequentially", read_sequentially),
                               ("reloaded page by page", reload_page_by_page)):
            if prepare is not None:
                prepare(path)
            for seed, way in enumerate(WAYS):
                seconds, chosen = time_way(path, way, args.rows, args.gathers, seed)
                per_row = np.median(seconds) / args.rows * 1e6
                print(f"{state:<24}{way:<8}{np.median(seconds) * 1e3:>10.1f}{min(seconds) * 1e3:>8.1f}"
                      f"{max(seconds) * 1e3:>8.1f}{per_row:>8.2f} {chosen}".rstrip())


if __name__ == "__main__":
    main()
