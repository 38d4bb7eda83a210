"""Memory-layout helpers shared by the kernel launchers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def contiguous_stand_ins(
    tensors: Sequence[torch.Tensor | None], read_only: Sequence[int] = ()
) -> Iterator[list[torch.Tensor | None]]:
    """Yield a contiguous tensor for each of ``tensors``: itself where it already is, a copy where not.

    On a clean exit the copies are written back into the originals, so a kernel that needs contiguous
    memory updates non-contiguous params and moments correctly; never those at the positions ``read_only``
    (grads: read, never written). On an exception nothing is written back.
    """
    stand_ins = [t if t is None or t.is_contiguous() else t.contiguous() for t in tensors]
    yield stand_ins
    for index, (original, stand_in) in enumerate(zip(tensors, stand_ins, strict=True)):
        if stand_in is not original and index not in read_only:
            original.copy_(stand_in)


def readable(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` as a kernel reads it: dense and contiguous, with torch's negative bit applied (a view such as
    ``x.conj().imag`` has its values negated lazily: its memory holds the opposite sign)."""
    if grad.is_neg():
        return grad.clone(memory_format=torch.contiguous_format)  # (a clone applies the negation)
    return grad if grad.is_contiguous() else grad.contiguous()
