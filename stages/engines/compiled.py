"""numba compilation with numba's on-disk cache where it can be written.

`njit(cache=True)` fails at decoration time when no cache location is writable (a read-only
install run by a user without a home directory, as in the Docker images; they set
NUMBA_CACHE_DIR). Then the kernels are compiled in each process instead: the same code, ~2 s
more at the first call."""

from __future__ import annotations


def njit(function):
    """`numba.njit(nogil=True)` with the on-disk cache when possible. nogil: the callers run the
    kernels in threads."""
    import numba

    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)
