"""Torch-function modes carried into custom autograd backwards.

torch runs the backward of a custom ``torch.autograd.Function`` (ours, and megatron's activation
recompute, which runs a forward there) with no torch-function mode active, though dispatch modes
carry over. The runtime's function modes (the device guard's, the launch counter's) must see what
those backwards do, so each is registered here and a fresh one is entered around every custom
backward, the first registered lowest, as they stack in the forward.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_carried: list = []  # what makes each mode, the lowest first
_installed = False


def _install() -> None:
    global _installed
    _installed = True
    apply = torch.autograd.function.BackwardCFunction.apply

    @functools.wraps(apply)
    def with_modes(self, *args):
        with contextlib.ExitStack() as modes:
            for make_mode in tuple(_carried):
                modes.enter_context(make_mode())
            return apply(self, *args)

    torch.autograd.function.BackwardCFunction.apply = with_modes


def carry(make_mode) -> None:
    """Enter ``make_mode()`` around every custom backward from now on (on top of those carried
    already), until :func:`drop`."""
    if not _installed:
        _install()
    _carried.append(make_mode)


def drop(make_mode) -> None:
    """Stop carrying ``make_mode``."""
    _carried.remove(make_mode)
