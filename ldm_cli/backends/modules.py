"""Swapping a model's modules for faster equivalents, by type, keeping their parameters and names."""

from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def retype(module: nn.Module, cls: type[M]) -> M:
    """`module` as an instance of `cls`, a subclass of its class that adds behaviour but no parameters:
    the new object shares the old one's parameters, buffers and children, so state-dict keys are unchanged."""
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"{cls.__name__} does not extend {type(module).__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def replace_modules(root: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every descendant `m` of `root` for which `swap(m)` returns a module; returns how many.
    Children are visited before their replacement is asked for, so a swap sees swapped children."""
    count = 0
    for name, child in list(root.named_children()):
        count += replace_modules(child, swap)
        new = swap(child)
        if new is not None and new is not child:
            setattr(root, name, new)
            count += 1
    return count
