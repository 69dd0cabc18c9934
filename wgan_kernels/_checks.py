"""Argument checks shared by the op families: each raises ValueError naming the argument."""

from __future__ import annotations

import math

import torch


def finite_number(name: str, value, *, low: float | None = None, low_inclusive: bool = True) -> float:
    """``value`` as a float: a finite real number (not a bool), ``>= low`` (``> low`` when not
    ``low_inclusive``) when ``low`` is given."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if not ok:
        bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
        raise ValueError(f"{name}: expected a finite number{bound}, got {value!r}")
    return float(value)


def as_list(items, name: str) -> list:
    """A tensor as a one-item list, any other iterable as a list (items not checked)."""
    if isinstance(items, torch.Tensor):
        return [items]
    try:
        return list(items)
    except TypeError:
        raise ValueError(f"{name}: expected a tensor or an iterable of tensors, got {type(items).__name__}") from None


def check_tensors(items: list, name: str) -> None:
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")


def tensor_list(items, name: str) -> list[torch.Tensor]:
    """``as_list`` then ``check_tensors``."""
    items = as_list(items, name)
    check_tensors(items, name)
    return items
