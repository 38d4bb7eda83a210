"""Memory-layout helpers shared by the kernel launchers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def contiguous_stand_ins(tensors: Sequence[torch.Tensor | None]) -> Iterator[list[torch.Tensor | None]]:
    """Yield a contiguous tensor for each of ``tensors``: itself where it already is, a copy where not.

    On a clean exit the copies are written back into the originals, so a kernel that needs contiguous
    memory updates non-contiguous params and moments correctly. On an exception nothing is written back.
    """
    stand_ins = [t if t is None or t.is_contiguous() else t.contiguous() for t in tensors]
    yield stand_ins
    for original, stand_in in zip(tensors, stand_ins, strict=True):
        if stand_in is not original:
            original.copy_(stand_in)
