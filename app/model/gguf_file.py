"""A fast GGUF header reader: metadata and tensor descriptors, data left memory-mapped.

gguf.GGUFReader builds numpy memmap views for every array element of the metadata; on SmolLM2's
98k tokenizer strings that takes 5 s per open (measured), paid again in every rank. This reader
decodes the same header in well under a second and hands tensor data to `gguf.quants` for
dequantization, so the library still owns the quantization formats."""

from __future__ import annotations

import math
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
# the fewest bytes a value of each type takes (a string: its length; an array: type and count)
_MIN_BYTES = {t: struct.calcsize(f) for t, f in _SCALARS.items()} | {_STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 2  # arrays of arrays at most; llama.cpp writes none


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
    """Reads the header, checking every length and count against the bytes left in the file before
    reading or allocating: a corrupt length (a key of 2**40 bytes) is an error naming the file and
    the place, not a MemoryError or an OverflowError from deep inside."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size
        self.where = "the header"  # what is being read, for messages

    def corrupt(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: truncated or corrupt GGUF header: {what}")

    def take(self, n: int) -> bytes:
        left = self.size - self.f.tell()
        if n > left:
            raise self.corrupt(
                f"{self.where} needs {n} bytes at offset {self.f.tell()}, past the end of the file ({left} left)"
            )
        return self.f.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, n: int, item_bytes: int, what: str) -> int:
        """n, if n items of at least item_bytes each fit in what is left of the file."""
        left = self.size - self.f.tell()
        if n * item_bytes > left:
            raise self.corrupt(f"{self.where}: {n} {what} cannot fit in the {left} bytes left")
        return n

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype not in _MIN_BYTES:
                raise self.corrupt(f"{self.where}: unknown GGUF value type {itype}")
            if itype == _ARRAY and depth >= MAX_ARRAY_DEPTH:
                raise self.corrupt(f"{self.where}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            self.count(count, _MIN_BYTES[itype], "array items")
            if itype == _STRING:
                return [self.string() for _ in range(count)]
            if itype in _NUMPY:
                dt = np.dtype(_NUMPY[itype])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            return [self.value(itype, depth + 1) for _ in range(count)]
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise self.corrupt(f"{self.where}: unknown GGUF value type {vtype}")


@lru_cache(maxsize=4)
def read_gguf(path: Path) -> GGUFFile:
    """Parse the header once per process (config, tokenizer and weights all read it)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _Cursor(f, path, size)
        if cur.take(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
        version = cur.unpack("<I")
        if not 2 <= version <= 3:
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        cur.count(n_kv, _MIN_KV_BYTES, "metadata entries")
        cur.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor descriptors")
        fields: dict[str, Any] = {}
        for i in range(n_kv):
            cur.where = f"metadata entry {i}"
            key = cur.string()
            cur.where = f"metadata entry {i} ({key[:80]!r})"
            if key in fields:
                raise cur.corrupt(f"{cur.where} appears twice")
            fields[key] = cur.value(cur.unpack("<I"))
        raw_infos = []
        for i in range(n_tensors):
            cur.where = f"tensor descriptor {i}"
            name = cur.string()
            cur.where = f"tensor descriptor {i} ({name[:80]!r})"
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise cur.corrupt(f"{cur.where} has {n_dims} dimensions (1 to {MAX_DIMS})")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            raw_infos.append((cur.where, name, dims, cur.unpack("<I"), cur.unpack("<Q")))
        align = fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise cur.corrupt(f"general.alignment {align!r} is not a power of two")
        data_start = -(-f.tell() // align) * align
    return GGUFFile(path, fields, _tensor_infos(cur, raw_infos, data_start, align))


def _tensor_infos(
    cur: _Cursor, raw_infos: list[tuple[str, str, list[int], int, int]], data_start: int, align: int
) -> dict[str, GGUFTensorInfo]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = {}
    for where, name, dims, qtype, rel in raw_infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{cur.path}: tensor {name} has unknown GGML type {qtype}") from None
        if name in tensors:
            raise cur.corrupt(f"{where}: a second tensor of that name")
        if dims[0] % block:
            raise cur.corrupt(f"{where}: shape {dims} does not hold whole blocks of {block}")
        nbytes = math.prod(dims) // block * type_size  # Python ints: no overflow however large
        offset = data_start + rel
        if rel % align:
            raise cur.corrupt(f"{where}: data offset {rel} is not a multiple of the alignment {align}")
        if offset + nbytes > cur.size:
            raise ModelLoadError(f"{cur.path}: truncated (tensor {name} ends past the end of the file)")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, offset, nbytes)
    return tensors
