"""What start-up says about memory: the KV reservation and how much of it is resident, and the
README's figures equal to the code's."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from app.device import Device
from app.model.memory import resident_bytes
from app.settings import Settings
from app.worker.runner import allocate_kv
from tests.support.forward import load_ours
from tests.support.models import tiny_llama

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_kv_fraction_is_the_code_s():
    text = README.read_text()
    figures = set(re.findall(r"`--kv-cache-memory-fraction` \(([0-9.]+)\)", text))
    assert figures == {str(Settings.model_fields["kv_cache_memory_fraction"].default)}


def test_a_reservation_is_resident_only_where_written():
    mib = 2**20
    _pin = heap_churn()
    kv = Device("cpu").alloc(256 * mib)
    nbytes = kv.numel()
    assert resident_bytes(kv.data_ptr(), nbytes) < 4 * mib
    kv[: 8 * mib] = 1
    assert 8 * mib <= resident_bytes(kv.data_ptr(), nbytes) < 12 * mib
    kv.fill_(2)
    assert resident_bytes(kv.data_ptr(), nbytes) == nbytes
    assert resident_bytes(kv.data_ptr() + 100, 5000) == 5000  # unaligned: clipped to the range
    assert resident_bytes(kv.data_ptr(), 0) == 0


def test_the_kv_cache_is_fresh_pages_after_a_load(tmp_path_factory):
    """A rank allocates its KV cache after loading the weights, whose temporaries leave freed,
    resident memory in malloc's heap; the reservation must not land there."""
    loaded = load_ours(tiny_llama(tmp_path_factory))
    _pin = heap_churn()
    storage, _ = allocate_kv(loaded, num_blocks=8192, block_size=16, dtype=torch.float32)
    assert storage.numel() * 4 >= 64 * 2**20
    assert resident_bytes(storage.data_ptr(), storage.numel() * 4) < 2**20


def heap_churn() -> torch.Tensor:
    """Leave malloc's heap with ~400 MiB freed but resident (pinned below a live chunk, so not
    trimmed while the returned chunk lives): torch.empty of 256 MiB is then served from it, pages
    already written."""
    mib = 2**20
    torch.ones(30 * mib // 4)  # freed at once: raises glibc's dynamic mmap threshold past 20 MiB
    chunks = [torch.ones(20 * mib // 4) for _ in range(20)]
    pin = torch.ones(20 * mib // 4)
    del chunks
    return pin
