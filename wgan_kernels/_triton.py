"""Triton in one place: the import guard, the interpreter switch and shared helpers.

Under ``TRITON_INTERPRET=1`` Triton kernels run on CPU tensors, which makes the interpreter a
real backend for the tests (it has no bfloat16: interpreter tests use float16/float32).
"""

from __future__ import annotations

import functools

from ._env import getenv

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - any import failure means "no Triton"
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def available() -> bool:
    return triton is not None


def import_error() -> str | None:
    return _IMPORT_ERROR


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return getenv("TRITON_INTERPRET", "0") == "1"


def version() -> str | None:
    return None if triton is None else triton.__version__


@functools.lru_cache(maxsize=None)
def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
