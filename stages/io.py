"""Reading and writing a stage's shards; shared by stages and runners.

Stage shards are Arrow IPC files (`.arrow`, uncompressed): the next stage reads them back with
no decoding. Parquet decodes nested lists slowly: a 100k-row candidates shard took 1.9 s to read
and 2.7 s to write as lz4 Parquet, 0.17 s and 0.70 s as Arrow IPC, at 2.8x the bytes on disk
(1M-document run, `benchmarks/scale.py`). Parquet shards read the same way: the output's
rejects (a user-facing file), vectors a user gives as a folder of Parquet files, and work dirs
of earlier versions."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import mmap
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

SHARD_SUFFIXES = (".arrow", ".parquet")



@contextlib.contextmanager
def arrow_allocator() -> Iterator[None]:
    """Arrow allocates from the C library's allocator while the pipeline runs, then the caller's
    pool is back (`import hardneg` changes nothing). This pyarrow's default (mimalloc) hands freed
    memory back to the kernel and takes fresh pages for the next batch: at 1M documents the lexical
    stage took 9.9 s and the write stage 8.4 s with it, 5.9 s and 4.5 s with the C library's
    (reading one small column of a 1 GB IPC shard: 1.0-1.2 s against 0.015 s). A pool the user
    chose with ARROW_DEFAULT_MEMORY_POOL is kept."""
    before = use_pipeline_allocator()
    try:
        yield
    finally:
        pa.set_memory_pool(before)


def use_pipeline_allocator() -> pa.MemoryPool:
    """Set `arrow_allocator`'s pool for good (in a process of the pipeline's own: a Ray worker);
    returns the pool before."""
    before = pa.default_memory_pool()
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        pa.set_memory_pool(pa.system_memory_pool())
    return before


def shard_files(directory: Path) -> list[Path]:
    # Sorted names make every reader see the rows in the same order.
    return sorted(p for p in Path(directory).glob("*") if p.suffix in SHARD_SUFFIXES)


def _ipc_reader(source: pa.NativeFile, columns: list[str] | None) -> ipc.RecordBatchFileReader:
    """An IPC file reader that reads only `columns`' buffers from the file. A plain file, not a
    memory map: a map would keep every page it read resident (and counted) until closed."""
    if columns is None:
        return ipc.open_file(source)
    names = ipc.open_file(source).schema.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise KeyError(f"{source}: no column {missing[0]!r}")
    return ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns]))


def shard_schema(file: Path) -> pa.Schema:
    if file.suffix == ".parquet":
        return pq.read_schema(file)
    with pa.OSFile(str(file)) as source:
        return ipc.open_file(source).schema


def shard_groups(file: Path) -> int:
    """How many row groups (Parquet) or record batches (IPC) `file` holds: its units of random
    access, read by `read_group`."""
    if file.suffix == ".parquet":
        return pq.ParquetFile(file).num_row_groups
    with pa.OSFile(str(file)) as source:
        return ipc.open_file(source).num_record_batches


def read_group(file: Path, group: int, columns: list[str] | None = None) -> pa.Table:
    if file.suffix == ".parquet":
        return pq.ParquetFile(file).read_row_group(group, columns=columns, use_threads=False)
    with pa.OSFile(str(file)) as source:
        table = pa.Table.from_batches([_ipc_reader(source, columns).get_batch(group)])
    return table if columns is None else table.select(columns)


def _file_batches(file: Path, batch_size: int, columns: list[str] | None, whole: bool) -> Iterator[pa.Table]:
    """Tables of `batch_size` rows (the file's last one shorter), one chunk each, as Parquet's
    iter_batches cuts them: the same batches, whichever format the shard has. `whole`: of an IPC
    file, runs of its record batches of at least `batch_size` rows, as they are (no copy)."""
    if file.suffix == ".parquet":
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=columns):
            yield pa.Table.from_batches([batch])
        return
    with pa.OSFile(str(file)) as source:
        reader = _ipc_reader(source, columns)
        held: list[pa.RecordBatch] = []
        rows = 0
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            held.append(batch)
            rows += batch.num_rows
            if whole:
                if rows >= batch_size:
                    yield pa.Table.from_batches(held)
                    held, rows = [], 0
                continue
            while rows >= batch_size:
                table = pa.Table.from_batches(held)
                yield table.slice(0, batch_size).combine_chunks()
                rest = table.slice(batch_size)
                held, rows = rest.to_batches(), rest.num_rows
        if rows:
            table = pa.Table.from_batches(held)
            yield table if whole else table.combine_chunks()


def iter_batches(directory: Path, batch_size: int, columns: list[str] | None = None,
                 whole: bool = False) -> Iterator[pa.Table]:
    """The shards' rows in batches of `batch_size`; `whole=True` for a reader that only needs
    every row once, in order, in batches of about that size: whole record batches, not copied
    into exact sizes (at 1M, the write stage's scans took it from 9.0-10.9 s to 4.7-6.2 s, and
    its peak RSS from 2.6 to 2.0 GiB)."""
    for file in shard_files(directory):
        for table in _file_batches(file, batch_size, columns, whole):
            yield table if columns is None else table.select(columns)


def _read_file(file: Path, columns: list[str] | None) -> pa.Table:
    if file.suffix == ".parquet":
        return pq.read_table(file, columns=columns)
    with pa.OSFile(str(file)) as source:
        table = _ipc_reader(source, columns).read_all()
    return table if columns is None else table.select(columns)


def read_table(directory: Path, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
    files = shard_files(directory)
    if not files:
        if schema is None:
            raise FileNotFoundError(f"no shards in {directory}")
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)
    return pa.concat_tables(_read_file(f, columns) for f in files)


def embedding_matrix(table: pa.Table, dim: int | None = None, column: str = "embedding") -> np.ndarray:
    """A list<float> column (a batch's vectors) as an (n, dim) matrix, with no Python object per
    value: the one place vectors leave Arrow."""
    if table.num_rows == 0:  # numpy cannot infer a width from no values
        return np.zeros((0, dim or 0), dtype=np.float32)
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim) if dim is not None else flat.reshape(table.num_rows, -1)


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set.

    Reading a memmap leaves every touched page mapped, so a pass over a 1.5 GB vectors file ends
    with 1.5 GB resident, though the process needs one chunk at a time. The pages stay in the
    kernel's page cache (the next touch is a cheap minor fault); only this process's share goes.
    Written pages of a shared file mapping stay in the page cache as dirty pages, so no write is
    lost and none is forced to disk here (a per-chunk msync made the writer wait for the disk;
    a writer that wants the file durable flushes once at its end). A no-op for ordinary arrays."""
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(handle, "madvise"):
        handle.madvise(mmap.MADV_DONTNEED)


class VectorFile:
    """Rows of a 2-D `.npy` matrix (the index's stored vectors), read on demand with a bounded
    resident set.

    Reading a memory map faults in the pages *around* each row too (the kernel's fault-around),
    so scattered lookups over a run leave the whole file resident: 1.5 GB for a million 384-d
    vectors. Here rows are gathered a block at a time and the block's pages are released right
    after, so a process holds the rows it asked for and little else; repeated reads come from the
    kernel's page cache. Scattered rows (`take`) are gathered in compiled code where numba is
    installed, by whichever of two ways has cost less per row so far on this file (both give the
    same bytes; `Gather`):
    - through the mapping, a block's fault-around windows released after it: one fault maps a
      window of rows;
    - pread(2), a system call per row.
    Which costs less depends on how the page cache holds the file (`benchmarks/gather.py`, 51k
    scattered rows of 1.5 KiB): after a sequential read the mapping took 15.5 ms against 44.9;
    written through a memory map, or brought back page by page, 126-157 ms against 56-66. In
    the candidates stage after a fresh index build here the mapping was the cheaper, 2.5x."""

    BLOCK = 1024  # rows gathered between two releases: at most ~64 MB of mapped pages
    # The kernel maps pages around a faulting one in aligned windows of this size (its default
    # fault_around_bytes), so a block's release covers the windows its rows fell in.
    FAULT_AROUND = 64 * 1024

    def __init__(self, path: Path, gather: str = "auto") -> None:
        self._path = Path(path)
        self._matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        if self._matrix.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D matrix, got shape {self._matrix.shape}")
        self.shape = self._matrix.shape
        self._row_bytes = self.shape[1] * self._matrix.dtype.itemsize
        self._base = self._matrix.offset  # where row 0 starts in the file
        self._gather = Gather(gather)
        self._fd: int | None = None  # opened on the first pread gather

    def __len__(self) -> int:
        return self.shape[0]

    @classmethod
    def behind(cls, array: np.ndarray) -> "VectorFile | None":
        """The file of a whole-file 2-D .npy memmap (as np.load(mmap_mode="r") returns), else None."""
        if not (isinstance(array, np.memmap) and array.filename and array.ndim == 2 and array.flags.c_contiguous):
            return None
        try:
            source = cls(Path(array.filename))
        except (OSError, ValueError):
            return None
        whole = source.shape == array.shape and source._base == array.offset and source._matrix.dtype == array.dtype
        return source if whole else None

    def _mapped_from(self) -> int:
        """The address the mapping starts at: a page boundary at or before row 0 (numpy's memmap
        offset)."""
        return self._matrix.ctypes.data - self._base % mmap.ALLOCATIONGRANULARITY

    def _release(self, first_row: int, stop_row: int) -> None:
        handle = getattr(self._matrix, "_mmap", None)
        if not isinstance(handle, mmap.mmap) or not hasattr(handle, "madvise"):
            return
        start, row0 = self._mapped_from(), self._matrix.ctypes.data
        lo, hi = row0 + first_row * self._row_bytes, row0 + stop_row * self._row_bytes
        # Fault-around windows are aligned by address: widen to them, within the mapping (as
        # the compiled gather's release does).
        lo, hi = max(start, lo - lo % self.FAULT_AROUND), min(start + len(handle), hi + -hi % self.FAULT_AROUND)
        handle.madvise(mmap.MADV_DONTNEED, lo - start, hi - lo)

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.array(self._matrix[start:stop])
        self._release(start, stop)
        return out

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The given rows (any order, repeats allowed), in that order: into `out` when given (a
        (len(rows), dim) array of the file's dtype, e.g. a buffer the caller reuses), else into
        a new array."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if out is not None and (out.shape != (len(rows), self.shape[1]) or out.dtype != self._matrix.dtype):
            raise ValueError(f"out: expected a {(len(rows), self.shape[1])} {self._matrix.dtype} array")
        if len(rows) and ((rows < 0).any() or (rows >= self.shape[0]).any()):
            raise IndexError(f"row out of range 0..{self.shape[0] - 1}")
        in_order = len(rows) < 2 or bool((rows[1:] > rows[:-1]).all())  # sorted and distinct
        if in_order:
            unique, inverse = rows, None
        else:
            unique, inverse = np.unique(rows, return_inverse=True)
        gathered = out if in_order and out is not None else np.empty((len(unique), self.shape[1]), self._matrix.dtype)
        handle = getattr(self._matrix, "_mmap", None)
        compiled = isinstance(handle, mmap.mmap) and self._matrix.flags.c_contiguous and len(unique) and self._row_bytes
        kernels = _compiled_gathers() if compiled else None
        if kernels is None:
            for b0 in range(0, len(unique), self.BLOCK):
                block = unique[b0:b0 + self.BLOCK]
                gathered[b0:b0 + len(block)] = self._matrix[block]
                self._release(int(block[0]), int(block[-1]) + 1)
        else:
            way = self._gather.next()
            started = time.perf_counter()
            if way == "mapped":
                kernels[0](self._matrix, unique, gathered, self.BLOCK, self._mapped_from(), len(handle), self.FAULT_AROUND)
            else:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDONLY)
                    weakref.finalize(self, os.close, self._fd)
                done = kernels[1](self._fd, self._base, self._row_bytes, unique, gathered.reshape(len(unique), -1).view(np.uint8))
                if done != len(unique):
                    raise OSError(f"{self._path}: short read at row {int(unique[done])}")
            self._gather.record(way, time.perf_counter() - started, len(unique))
        if in_order:
            return gathered
        return np.take(gathered, inverse.reshape(-1), axis=0, out=out)


class Gather:
    """Which compiled gather `VectorFile.take` uses: "mapped", "pread", or "auto", the one with
    the lower cost per row so far. Each is tried three times first (the first call of each is
    not counted: it compiles the kernel, or loads it from numba's cache), and the other once
    every `RETRY` calls after, so the choice follows the page cache as it changes."""

    WAYS = ("mapped", "pread")
    RETRY = 64

    def __init__(self, way: str = "auto") -> None:
        if way not in (*self.WAYS, "auto"):
            raise ValueError(f"gather: expected one of {self.WAYS + ('auto',)}, got {way!r}")
        self.way = way
        self.calls = 0
        self.cost = {w: [0.0, 0] for w in self.WAYS}  # seconds, rows
        self._warm: set[str] = set()

    def next(self) -> str:
        if self.way != "auto":
            return self.way
        self.calls += 1
        if self.calls <= 3 * len(self.WAYS):
            return self.WAYS[self.calls % len(self.WAYS)]
        best = self.best()
        if self.calls % self.RETRY == 0:
            return next(w for w in self.WAYS if w != best)
        return best

    def best(self) -> str:
        """The way with the lower cost per row so far."""
        return min(self.WAYS, key=lambda w: self.cost[w][0] / max(1, self.cost[w][1]))

    def record(self, way: str, seconds: float, rows: int) -> None:
        if way not in self._warm:
            self._warm.add(way)
            return
        # Recent calls weigh more: the sums decay, so a changed page cache shows within a few calls.
        spent = self.cost[way]
        spent[0], spent[1] = 0.75 * spent[0] + seconds, 0.75 * spent[1] + rows


@functools.lru_cache(maxsize=1)
def _compiled_gathers():
    """(mapped, pread) compiled gathers of sorted rows, or None without numba (numpy then gathers
    from the mapping, block by block). Compiled on the first `take` (or loaded from numba's
    cache). nogil: two candidates batch threads gather at once.
    - mapped: copies a block of rows out of the memory map, then releases the block's pages
      (madvise MADV_DONTNEED over its fault-around windows);
    - pread: one pread(2) per row into the output; no page is mapped."""
    try:
        from numba import types
    except ImportError:
        return None
    from hardneg.stages.engines.compiled import njit

    madvise = types.ExternalFunction("madvise", types.intc(types.voidptr, types.uintp, types.intc))
    pread = types.ExternalFunction("pread", types.intp(types.intc, types.voidptr, types.uintp, types.int64))
    dontneed = mmap.MADV_DONTNEED

    @njit
    def mapped(matrix, rows, out, block, mapped_from, mapped_bytes, window):
        # rows: sorted, in range. The mapping spans [mapped_from, mapped_from + mapped_bytes).
        width = matrix.shape[1]
        for b0 in range(0, rows.shape[0], block):
            b1 = min(rows.shape[0], b0 + block)
            for i in range(b0, b1):
                row = rows[i]
                for j in range(width):
                    out[i, j] = matrix[row, j]
            # Fault-around windows are aligned by address: widen to them, within the mapping.
            lo = matrix[rows[b0]:].ctypes.data
            hi = matrix[rows[b1 - 1]:].ctypes.data + width * matrix.itemsize
            lo = max(mapped_from, lo - lo % window)
            hi = min(mapped_from + mapped_bytes, hi + (window - hi % window) % window)
            madvise(lo, hi - lo, dontneed)

    @njit
    def by_pread(fd, base, row_bytes, rows, out):
        # out: (len(rows), row_bytes) bytes; returns how many rows were read in full.
        for i in range(rows.shape[0]):
            if pread(fd, out[i].ctypes.data, row_bytes, base + rows[i] * row_bytes) != row_bytes:
                return i
        return rows.shape[0]

    return mapped, by_pread


def lists_like(column: pa.Array, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Flat per-element `values` as lists shaped like the list column `column` (one value per
    element of each row), null where a value is NaN (not computed)."""
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.asarray(values).astype(value_type.to_pandas_dtype()),
                                                      value_type, from_pandas=True))


def count_rows(directory: Path) -> int:
    return sum(_file_rows(f) for f in shard_files(directory))


def _file_rows(file: Path) -> int:
    if file.suffix == ".parquet":
        return pq.ParquetFile(file).metadata.num_rows
    with pa.OSFile(str(file)) as source:
        return ipc.open_file(source).count_rows()


# Parquet files that leave the work dir (the output's rejects): no dictionary pages (on the
# candidates tables they halved the write speed and made the files larger), lz4 (the fastest codec
# to write and read here), no min/max statistics (for skipping row groups by value: nothing here
# does, and they took a fifth of the time to write).
PARQUET_OPTIONS = {"compression": "lz4", "use_dictionary": False, "write_statistics": False}
# The corpus_vectors stage at 1M (1.5 GB of shards) took 5.4-8.2 s written as 100 MB record
# batches, 1.5 s as 4 MB ones (mostly the kernel's time in write(2)).
IPC_BATCH_BYTES = 4 << 20


class ShardWriter:
    """Write tables into numbered shards of at most `rows_per_shard` rows: Arrow IPC files (the
    work dir's format), or Parquet with `parquet=True` (files a user reads)."""

    def __init__(self, directory: Path, schema: pa.Schema | None = None, rows_per_shard: int = 100_000,
                 prefix: str = "part", parquet: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self.suffix = ".parquet" if parquet else ".arrow"
        self._writer = None
        self._sink: pa.NativeFile | None = None
        self._rows_in_shard = 0
        self._shards = 0
        self.rows = 0

    def _open(self) -> None:
        path = self.directory / f"{self.prefix}-{self._shards:05d}{self.suffix}"
        if self.suffix == ".parquet":
            self._writer = pq.ParquetWriter(path, self.schema, **PARQUET_OPTIONS)
        else:
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = ipc.new_file(self._sink, self.schema)
        self._shards += 1
        self._rows_in_shard = 0

    def _close_shard(self) -> None:
        self._writer.close()
        self._writer = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        table = table.cast(self.schema) if table.schema != self.schema else table
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open()
            take = min(table.num_rows - offset, self.rows_per_shard - self._rows_in_shard)
            self._write(table.slice(offset, take))
            offset += take
            self._rows_in_shard += take
            self.rows += take
            if self._rows_in_shard >= self.rows_per_shard:
                self._close_shard()

    def _write(self, part: pa.Table) -> None:
        if self.suffix == ".parquet" or part.num_rows == 0:
            self._writer.write_table(part)
            return
        # Record batches of about IPC_BATCH_BYTES: the writer hands each buffer to one write(2),
        # and here a 100 MB write took 3-5x as long as the same bytes in megabyte writes.
        rows = IPC_BATCH_BYTES * part.num_rows // max(1, part.nbytes)
        self._writer.write_table(part, max_chunksize=max(1, rows))

    def write_rows(self, rows: list[dict]) -> None:
        if rows:
            self.write(pa.Table.from_pylist(rows, schema=self.schema))

    def close(self) -> None:
        if self._writer is None and self._shards == 0 and self.schema is not None:
            self._open()  # an empty output is still a readable table with the right columns
        if self._writer is not None:
            self._close_shard()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DocIds:
    """The corpus's document ids (an Arrow array, row order) with numpy lookups: id -> row by a
    binary search of the ids' UTF-8 bytes (or, for many ids of at most 8 bytes, a compiled hash
    table), row -> string-order rank. No Python object per document (a dict of a million ids
    costs ~100 MB per worker)."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        self.array = ids.cast(pa.string())
        # Bytewise UTF-8 = code point order. Arrow's indices are uint64; as int64 a missing id's
        # row is -1 under every numpy (np.where(found, uint64 rows, -1) raises on some).
        order = pc.sort_indices(self.array).to_numpy().astype(np.int64)
        self.rank = np.empty(len(order), dtype=np.int64)
        self.rank[order] = np.arange(len(order))
        self._order = order
        self._sorted = id_bytes(self.array.take(pa.array(order)))
        # Ids of at most 8 bytes compare as big-endian integers (memcmp order, NUL-padded), and
        # an integer binary search is several times faster than one over byte strings.
        self._keys = _u64(self._sorted) if self._sorted.dtype.itemsize <= 8 else None

    def __len__(self) -> int:
        return len(self.rank)

    def rows(self, ids: pa.Array) -> np.ndarray:
        """Row of each id, -1 for ids not in the corpus."""
        if len(ids) == 0 or len(self.rank) == 0:  # nothing to find, or nowhere to find it
            return np.full(len(ids), -1, dtype=np.int64)
        table = self._hash_table() if self._keys is not None and len(ids) >= HASH_LOOKUPS else None
        if table is not None and ids.null_count == 0:
            return self._rows_by_hash(ids, table)
        values = id_bytes(ids)
        if values.dtype.itemsize > self._sorted.dtype.itemsize:
            too_long = pc.binary_length(ids.cast(pa.binary())).to_numpy(zero_copy_only=False) > self._sorted.dtype.itemsize
            values = np.where(too_long, b"", values).astype(self._sorted.dtype)
        else:
            too_long = np.zeros(len(values), dtype=bool)
        if self._keys is not None:
            keys = _u64(values)
            order = np.argsort(keys)  # sorted needles: a cache-friendly binary search, ~5x faster
            at = np.empty(len(keys), dtype=np.int64)
            at[order] = np.minimum(np.searchsorted(self._keys, keys[order]), len(self._keys) - 1)
            found = (self._keys[at] == keys) & ~too_long
            return np.where(found, self._order[at], -1)
        at = np.minimum(np.searchsorted(self._sorted, values), len(self._sorted) - 1)
        found = (self._sorted[at] == values) & ~too_long
        return np.where(found, self._order[at], -1)

    def take(self, rows: np.ndarray) -> pa.Array:
        return self.array.take(pa.array(rows, type=pa.int64()))

    def _rows_by_hash(self, ids: pa.Array | pa.ChunkedArray, table: np.ndarray) -> np.ndarray:
        """`rows` through the hash table, the ids packed into keys straight from Arrow's buffers."""
        _, find, pack = _compiled_hash()
        binary = (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(pa.binary())
        _, offsets, data = binary.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int32)[binary.offset:binary.offset + len(binary) + 1]
        keys, at = np.empty(len(binary), dtype=np.uint64), np.empty(len(binary), dtype=np.int64)
        short = pack(offsets, np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8), keys)
        find(self._keys, table, _shift(table), keys, at)  # -1: not found
        return np.where((at >= 0) & short, self._order[np.maximum(at, 0)], -1)

    def _hash_table(self) -> np.ndarray | None:
        """The integer keys' slots in an open-addressing hash table (built once, on the first
        large lookup; None without numba). A lookup is then a probe or two, where sorting the
        needles for the binary search took most of the time: at 1M documents the lexical stage's
        20M candidate ids cost 4.4 s of lookups that way."""
        compiled = _compiled_hash()
        if compiled is None:
            return None
        with _HASH_LOCK:
            if getattr(self, "_slots", None) is None:
                size = 1 << max(1, int(len(self._keys) * 1.5)).bit_length()  # load <= 2/3
                slots = np.full(size, -1, dtype=np.int32 if len(self._keys) < (1 << 31) else np.int64)
                compiled[0](self._keys, slots, _shift(slots))
                self._slots = slots
        return self._slots


HASH_LOOKUPS = 4096  # ids per DocIds.rows call from which the hash table is built and used
_HASH_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _compiled_hash():
    """(insert, find) of an open-addressing hash table (linear probing, Fibonacci hashing) of
    uint64 keys, holding their positions, and `pack`, strings to such keys; None without numba."""
    if importlib.util.find_spec("numba") is None:
        return None
    from hardneg.stages.engines.compiled import njit

    @njit
    def insert(keys, slots, shift):
        mask = len(slots) - 1
        for i in range(len(keys)):
            h = np.int64((keys[i] * np.uint64(0x9E3779B97F4A7C15)) >> shift)
            while slots[h] >= 0:
                h = (h + 1) & mask
            slots[h] = i

    @njit
    def find(keys, slots, shift, needles, out):
        mask = len(slots) - 1
        for i in range(len(needles)):
            h = np.int64((needles[i] * np.uint64(0x9E3779B97F4A7C15)) >> shift)
            out[i] = -1
            while slots[h] >= 0:
                if keys[slots[h]] == needles[i]:
                    out[i] = slots[h]
                    break
                h = (h + 1) & mask

    @njit
    def pack(offsets, data, out):
        """Each string of an Arrow (offsets, bytes) pair as `_u64` gives it (big-endian, NUL
        padded); returns which were at most 8 bytes long (the others cannot be keys)."""
        short = np.ones(len(out), dtype=np.bool_)
        for i in range(len(out)):
            start, n = offsets[i], offsets[i + 1] - offsets[i]
            key = np.uint64(0)
            for j in range(8):
                key = key << np.uint64(8)
                if j < n:
                    key = key | np.uint64(data[start + j])
            out[i] = key
            short[i] = n <= 8
        return short

    return insert, find, pack


def _shift(slots: np.ndarray) -> np.uint64:
    # The hash is the top log2(len(slots)) bits of the key times 2^64 / golden ratio.
    return np.uint64(64 - (len(slots).bit_length() - 1))


def _u64(values: np.ndarray) -> np.ndarray:
    """Fixed-width byte strings of at most 8 bytes as integers in the same (memcmp) order."""
    return np.ascontiguousarray(values.astype("S8")).view(">u8").astype(np.uint64)


def id_bytes(ids: pa.Array) -> np.ndarray:
    # numpy's fixed-width bytes compare like memcmp, as Arrow sorts (ids hold no NUL bytes).
    # Built from the Arrow buffers (offsets, bytes) by numpy: no Python bytes object per id.
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    values = ids.cast(pa.binary())
    if len(values) == 0:
        return np.zeros(0, dtype="S1")
    if values.null_count:
        return np.array(values.to_numpy(zero_copy_only=False), dtype=bytes)
    _, offsets, data = values.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int32)[values.offset:values.offset + len(values) + 1]
    lengths = np.diff(offsets)
    width = max(1, int(lengths.max()))
    out = np.zeros((len(values), width), dtype=np.uint8)
    if offsets[-1] > offsets[0]:
        row = np.repeat(np.arange(len(values)), lengths)
        out[row, np.arange(len(row)) - np.repeat(offsets[:-1] - offsets[0], lengths)] = \
            np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]]
    return out.view(f"S{width}").reshape(len(values))
