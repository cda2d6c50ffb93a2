"""What start-up says about memory: the KV reservation and how much of it is resident, and the
README's figures equal to the code's."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from app.model.memory import resident_bytes
from app.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_kv_fraction_is_the_code_s():
    text = README.read_text()
    figures = set(re.findall(r"`--kv-cache-memory-fraction` \(([0-9.]+)\)", text))
    assert figures == {str(Settings.model_fields["kv_cache_memory_fraction"].default)}


def test_a_reservation_is_resident_only_where_written():
    mib = 2**20
    kv = torch.empty(256 * mib, dtype=torch.uint8)  # past malloc's mmap threshold: fresh pages
    nbytes = kv.numel()
    assert resident_bytes(kv.data_ptr(), nbytes) < 4 * mib
    kv[: 8 * mib] = 1
    assert 8 * mib <= resident_bytes(kv.data_ptr(), nbytes) < 12 * mib
    kv.fill_(2)
    assert resident_bytes(kv.data_ptr(), nbytes) == nbytes
    assert resident_bytes(kv.data_ptr() + 100, 5000) == 5000  # unaligned: clipped to the range
    assert resident_bytes(kv.data_ptr(), 0) == 0
