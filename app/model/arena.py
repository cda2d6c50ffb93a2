"""One contiguous buffer per rank holding every weight; modules' buffers become views into it.

The model is built on the meta device (no memory), then `pack_into_arena` lays out all of its
buffers, allocates the arena once through the device abstraction (page-aligned on CPU, device
memory on CUDA) and swaps each meta buffer for a view. Loaders then write into the views."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 64  # bytes: cache-line / vector alignment of each tensor inside the arena


@dataclass(frozen=True)
class ArenaLayout:
    entries: tuple[tuple[str, int, tuple[int, ...], torch.dtype], ...]  # (name, offset, shape, dtype)
    nbytes: int


def plan_layout(model: nn.Module) -> ArenaLayout:
    entries, offset = [], 0
    seen: set[int] = set()
    for name, buf in model.named_buffers(remove_duplicate=True):
        if id(buf) in seen:
            continue
        seen.add(id(buf))
        offset = -(-offset // ALIGN) * ALIGN
        entries.append((name, offset, tuple(buf.shape), buf.dtype))
        offset += buf.numel() * buf.element_size()
    return ArenaLayout(tuple(entries), -(-offset // ALIGN) * ALIGN)


def pack_into_arena(model: nn.Module, alloc: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Allocate the arena with `alloc(nbytes) -> uint8 tensor` and make every buffer a view."""
    layout = plan_layout(model)
    arena = alloc(layout.nbytes)
    for name, offset, shape, dtype in layout.entries:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        view = arena[offset : offset + size].view(dtype).view(shape)
        module._buffers[attr] = view
    return arena
