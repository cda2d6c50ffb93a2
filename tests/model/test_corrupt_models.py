"""Corrupt model files, corrupted here by the tests: random bytes in a GGUF's metadata, a key
length of 2**40, metadata that disagrees with the tensors, NaN and infinity in tensor data (GGUF,
quantized GGUF, safetensors). Each is refused with one line that names the file and what is wrong
(the traceback only with --debug), in-process and by a real `shardserve serve`."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from pathlib import Path

import pytest

from app.layers.parallel import TPContext
from app.model.errors import ModelLoadError
from app.model.gguf_file import read_gguf
from app.model.loader import load_model, read_config
from app.settings import Settings
from app.stack import read_model
from app.tokenizer.tokenizer import TokenizerError
from tests.support.api_server import ServeProcess
from tests.support.models import tiny_gguf, tiny_llama

pytestmark = pytest.mark.timeout(240)
FIRST_KEY_LENGTH = 4 + 4 + 8 + 8  # offset of the first key's length: magic, version, tensor and key counts


class NoComm:
    def all_reduce(self, t):  # type: ignore[no-untyped-def]
        return t

    def all_gather_last_dim(self, t):  # type: ignore[no-untyped-def]
        return t


def corrupted(src: Path, dst: Path, edits: dict[int, bytes]) -> Path:
    data = bytearray(src.read_bytes())
    for offset, value in edits.items():
        data[offset : offset + len(value)] = value
    dst.write_bytes(bytes(data))
    read_gguf.cache_clear()  # the header cache is keyed by path
    return dst


def one_line_naming(error: BaseException, path: Path, *words: str) -> None:
    message = str(error)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_random_bytes_in_gguf_metadata_are_one_line_errors_naming_the_file(tmp_path_factory, tmp_path):
    """The issue's probe found OverflowError and MemoryError tracebacks naming no file. 300 files,
    each with a few random runs of bytes in the header: each loads or fails with a ModelLoadError
    or TokenizerError that names the file in one line, and none takes long."""
    src = tiny_gguf(tmp_path_factory, "F32")
    header_end = min(t.offset for t in read_gguf(src).tensors.values())
    rng = random.Random(21)
    outcomes = {"loads": 0, "refused": 0}
    t0 = time.monotonic()
    for i in range(300):
        edits = {}
        for _ in range(rng.randint(1, 6)):
            edits[rng.randrange(8, header_end)] = rng.randbytes(rng.randint(1, 8))
        path = corrupted(src, tmp_path / f"fuzz{i % 4}.gguf", edits)
        try:
            read_model(Settings(model=str(path)))
            outcomes["loads"] += 1  # the bytes fell inside a token's text, say
        except (ModelLoadError, TokenizerError) as e:
            one_line_naming(e, path)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200 and time.monotonic() - t0 < 60, outcomes


def _n_dims_offset(raw: bytes, tensor: bytes) -> int:
    """Where a tensor descriptor's dimension count is, found by the tensor's name."""
    return raw.index(struct.pack("<Q", len(tensor)) + tensor) + 8 + len(tensor)


@pytest.mark.parametrize(
    ("what", "offset", "value", "words"),
    [
        ("a key of 2**40 bytes", lambda raw: FIRST_KEY_LENGTH, struct.pack("<Q", 2**40),
         ("1099511627776 bytes", "metadata entry 0", "past the end")),
        ("2**62 metadata entries", lambda raw: 16, struct.pack("<Q", 2**62), ("4611686018427387904 metadata entries",)),
        ("a tensor of 9 dimensions", lambda raw: _n_dims_offset(raw, b"token_embd.weight"), struct.pack("<I", 9),
         ("9 dimensions",)),
    ],
)  # fmt: skip
def test_impossible_lengths_and_counts_are_refused_before_allocating(tmp_path_factory, tmp_path, what, offset, value, words):  # fmt: skip
    src = tiny_gguf(tmp_path_factory, "F32")
    path = corrupted(src, tmp_path / "bad.gguf", {offset(src.read_bytes()): value})
    with pytest.raises(ModelLoadError) as info:
        read_config(path)
    one_line_naming(info.value, path, "corrupt GGUF header", *words)


def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path_factory, tmp_path):
    src = tiny_gguf(tmp_path_factory, "F32")
    raw = src.read_bytes()
    key = b"llama.block_count"
    at = raw.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4  # past the value type
    path = corrupted(src, tmp_path / "layers.gguf", {at: struct.pack("<I", 2**31)})
    with pytest.raises(ModelLoadError) as info:
        read_config(path)  # not a model of 2**31 layers built on the meta device
    one_line_naming(info.value, path, "2147483648 layers", "tensors of 2")


def _nan_in(path: Path, tensor: str, value: bytes, index: int = 7) -> None:
    info = read_gguf(path).tensors[tensor]
    corrupted(path, path, {info.offset + index: value})


@pytest.mark.parametrize(
    ("qtype", "tensor", "value", "index"),
    [
        ("F32", "blk.1.ffn_down.weight", struct.pack("<f", float("nan")), 4 * 100),
        ("F32", "output_norm.weight", struct.pack("<f", float("-inf")), 0),
        ("Q8_0", "blk.0.attn_q.weight", b"\x00\x7c", 34 * 3),  # a block's fp16 scale: +infinity
    ],
)
def test_a_non_finite_weight_refuses_to_load_naming_the_tensor(tmp_path_factory, tmp_path, qtype, tensor, value, index):  # fmt: skip
    path = tmp_path / f"{qtype}.gguf"
    shutil.copy(tiny_gguf(tmp_path_factory, qtype), path)
    read_gguf.cache_clear()
    load_model(path, "fp32", TPContext(0, 1), NoComm())  # intact, it loads
    _nan_in(path, tensor, value, index)
    for dtype in ("fp32", "int8"):
        with pytest.raises(ModelLoadError) as info:
            load_model(path, dtype, TPContext(0, 1), NoComm())
        one_line_naming(info.value, path, f"tensor {tensor} holds NaN or infinite values")


# ---- a real server -----------------------------------------------------------------------------


def serve_fails(*args: str, debug: bool = False) -> str:
    """Run serve on a bad model: it must exit 1 by itself; its whole output."""
    srv = ServeProcess(
        "--dtype", "fp32", "--kv-cache-tokens", "4096", *args, before=["--debug"] if debug else []
    )
    try:
        assert srv.wait_exit(90) == 1, srv.output[-3000:]
    finally:
        srv.stop()
    return srv.output


def test_serve_refuses_a_corrupt_header_in_one_line_and_shows_the_traceback_only_with_debug(tmp_path_factory, tmp_path):  # fmt: skip
    src = tiny_gguf(tmp_path_factory, "F32")
    bad = corrupted(src, tmp_path / "big-key.gguf", {FIRST_KEY_LENGTH: struct.pack("<Q", 2**40)})
    out = serve_fails("--model", str(bad))
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in out and "MemoryError" not in out, out
    assert lines[0].startswith(
        f"shardserve: error: the model failed to load: {bad}: truncated or corrupt GGUF header"
    )
    out = serve_fails("--model", str(bad), debug=True)
    assert "Traceback" in out and "truncated or corrupt GGUF header" in out


def test_serve_refuses_nan_weights_with_one_line_naming_file_and_tensor(tmp_path_factory, tmp_path):
    """The issue's probe: random bytes in tensor data loaded, said ready and answered
    <|endoftext|> at logprob -9999. Now the ranks refuse it; the server says so once and exits."""
    path = tmp_path / "nan.gguf"
    shutil.copy(tiny_gguf(tmp_path_factory, "F32"), path)
    _nan_in(path, "blk.0.ffn_up.weight", struct.pack("<f", float("nan")), 4 * 1000)
    out = serve_fails("--model", str(path))
    errors = [ln for ln in out.splitlines() if " ERROR " in ln or ln.startswith("shardserve: error:")]
    assert len(errors) == 1 and "Traceback" not in out and "ready:" not in out, out
    assert (
        f"the model failed to load: rank 0 failed to start: {path}: tensor blk.0.ffn_up.weight holds NaN"
        in errors[0]
    )


def test_serve_refuses_infinite_safetensors_weights_at_tp2(tmp_path_factory, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama(tmp_path_factory), model)
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    tensor = "model.layers.1.self_attn.o_proj.weight"
    begin = 8 + header_len + header[tensor]["data_offsets"][0]
    raw[begin + 4 * 33 : begin + 4 * 34] = struct.pack("<f", float("inf"))
    weights.write_bytes(bytes(raw))
    out = serve_fails("--model", str(model), "--tp", "2")
    errors = [ln for ln in out.splitlines() if "ERROR" in ln]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert f"{model}: tensor {tensor} holds NaN or infinite values" in errors[0]
