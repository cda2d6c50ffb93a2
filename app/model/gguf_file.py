"""A fast GGUF header reader: metadata and tensor descriptors, data left memory-mapped.

gguf.GGUFReader builds numpy memmap views for every array element of the metadata; on SmolLM2's
98k tokenizer strings that takes 5 s per open (measured), paid again in every rank. This reader
decodes the same header in well under a second and hands tensor data to `gguf.quants` for
dequantization, so the library still owns the quantization formats."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from app.model.errors import ModelLoadError

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: [out, in] for a matrix (GGUF stores it reversed)
    qtype: int  # gguf.GGMLQuantizationType value
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    fields: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    def data(self, name: str) -> np.ndarray:
        """The tensor's raw bytes (memory-mapped), rows first: [out, bytes per row]."""
        info = self.tensors[name]
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        return raw.reshape(info.shape[0], -1) if len(info.shape) > 1 else raw


class _Cursor:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelLoadError(f"{self.path}: truncated GGUF header")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype == _STRING:
                return [self.string() for _ in range(count)]
            if itype in _NUMPY:
                dt = np.dtype(_NUMPY[itype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype}")


@lru_cache(maxsize=4)
def read_gguf(path: Path) -> GGUFFile:
    """Parse the header once per process (config, tokenizer and weights all read it)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _Cursor(f, path)
        if cur.take(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        version = cur.unpack("<I")
        if version < 2:
            raise ModelLoadError(f"{path}: GGUF version {version} is too old (2 or 3 supported)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            fields[key] = cur.value(cur.unpack("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            raw_infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        align = int(fields.get("general.alignment", 32))
        data_start = -(-f.tell() // align) * align
    tensors = {}
    for name, dims, qtype, rel in raw_infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{path}: tensor {name} has unknown GGML type {qtype}") from None
        nbytes = int(np.prod(dims)) // block * type_size
        offset = data_start + rel
        if offset + nbytes > size:
            raise ModelLoadError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, nbytes)
    return GGUFFile(path, fields, tensors)
