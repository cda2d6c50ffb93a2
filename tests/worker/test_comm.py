"""The communicator across real rank processes (spawn + gloo on loopback), and app.device on CPU.

References are computed here in the parent from the same seeded inputs: sums in rank order
0..N-1 (which the shared-memory all-reduce promises bit for bit) and torch.cat for gathers.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from app.device import Device
from app.worker.comm import CommTimeout, cleanup, make_communicator
from app.worker.shm_allreduce import ShmAllReduce

SHAPES = [(1, 576), (7, 576), (512, 576)]
MAX_ELEMS = 100_000  # smaller than 512*576: the big shape takes several rounds
LOOP_CALLS = 1000
LOOP_SIZES = [576, 1, 7 * 576, 100]  # varying sizes through the double buffer
GATHER_ROWS = 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shm_name() -> str:
    return f"shardserve-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _shm_path(name: str) -> Path:
    return Path("/dev/shm") / name


def _input(rank: int, shape: tuple[int, ...], key: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * key + rank)
    return torch.randn(shape, generator=g)


def _ordered_sum(world: int, shape: tuple[int, ...], key: int) -> torch.Tensor:
    acc = _input(0, shape, key) + _input(1, shape, key)
    for r in range(2, world):
        acc = acc + _input(r, shape, key)
    return acc


def _gather_width(rank: int, big: bool) -> int:
    return (300 + 7 * rank) if big else (5, 3, 4)[rank]


def _join(rank: int, world: int, port: int) -> Device:
    from app.worker.comm import init_distributed

    torch.set_num_threads(1)
    device = Device.resolve("cpu")
    init_distributed(device, rank, world, f"tcp://127.0.0.1:{port}", timeout_s=120)
    return device


def _rank_main(rank: int, world: int, port: int, name: str, out_dir: str) -> None:
    import torch.distributed as dist

    from app.worker.comm import DistCommunicator

    device = _join(rank, world, port)
    comm = make_communicator(device, rank, world, shm_name=name, local=True, max_elems=MAX_ELEMS)
    comm.barrier()  # rank 0 unlinks the name once all attached: look after it surely did
    res: dict = {"type": type(comm).__name__, "visible_after_init": _shm_path(name).exists()}
    for i, shape in enumerate(SHAPES):
        x = _input(rank, shape, i)
        y = comm.all_reduce(x)
        res[f"ar{shape}"] = (y.clone(), y.data_ptr() == x.data_ptr())
    res["loop"] = [
        comm.all_reduce(_input(rank, (LOOP_SIZES[k % 4],), 100 + k)).clone() for k in range(LOOP_CALLS)
    ]
    res["bf16"] = comm.all_reduce(_input(rank, (7, 576), 40).bfloat16()).clone()  # torch path
    nc = _input(rank, (576, 8), 50).t()  # non-contiguous
    res["noncontig"] = comm.all_reduce(nc).clone()
    for big in (False, True):
        rows = 512 if big else GATHER_ROWS
        x = _input(rank, (rows, _gather_width(rank, big)), 60 + big)
        res[f"gather{big}"] = comm.all_gather_last_dim(x)
    res["bcast"] = comm.broadcast_object({"from": rank, "t": (1, 2)}, src=world - 1)
    gloo = DistCommunicator(device, rank, world)
    res["gloo_ar"] = gloo.all_reduce(_input(rank, (7, 576), 1))
    res["gloo_gather"] = gloo.all_gather_last_dim(_input(rank, (GATHER_ROWS, _gather_width(rank, False)), 60))
    comm.close()
    comm.barrier()

    # A peer that never arrives: only rank 0 enters the collective.
    late = make_communicator(
        device, rank, world, shm_name=name + "-t", local=True, max_elems=64, timeout_s=0.5
    )
    if rank == 0:
        start = time.monotonic()
        try:
            late.all_reduce(torch.ones(4))
            res["timeout"] = None
        except CommTimeout:
            res["timeout"] = time.monotonic() - start
        try:
            late.all_reduce(torch.ones(4))
            res["after_timeout"] = "no error"
        except CommTimeout:
            res["after_timeout"] = "CommTimeout"
    late.barrier()
    late.close()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _run_ranks(world: int, tmp_path: Path) -> tuple[str, list[dict]]:
    name = _shm_name()
    mp.spawn(_rank_main, args=(world, _free_port(), name, str(tmp_path)), nprocs=world, join=True)
    return name, [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_shm_collectives_across_processes(world: int, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    name, results = _run_ranks(world, tmp_path)
    for rank, res in enumerate(results):
        assert res["type"] == "ShmCommunicator"
        assert not res["visible_after_init"], "the name should be unlinked once every rank attached"
        for i, shape in enumerate(SHAPES):
            got, in_place = res[f"ar{shape}"]
            assert in_place
            assert torch.equal(got, _ordered_sum(world, shape, i)), (rank, shape)
        for k, got in enumerate(res["loop"]):
            assert torch.equal(got, _ordered_sum(world, (LOOP_SIZES[k % 4],), 100 + k)), (rank, k)
        assert torch.equal(res["noncontig"], _ordered_sum(world, (576, 8), 50).t())
        bf16 = [_input(r, (7, 576), 40).bfloat16() for r in range(world)]
        assert torch.equal(res["bf16"], sum(bf16[2:], bf16[0] + bf16[1]))
        for big in (False, True):
            rows = 512 if big else GATHER_ROWS
            ref = torch.cat([_input(r, (rows, _gather_width(r, big)), 60 + big) for r in range(world)], -1)
            assert torch.equal(res[f"gather{big}"], ref)
        assert res["bcast"] == {"from": world - 1, "t": (1, 2)}
        torch.testing.assert_close(res["gloo_ar"], _ordered_sum(world, (7, 576), 1))
        small = [_input(r, (GATHER_ROWS, _gather_width(r, False)), 60) for r in range(world)]
        assert torch.equal(res["gloo_gather"], torch.cat(small, -1))
    first = results[0]
    for res in results[1:]:  # bitwise identical on every rank
        for key in [f"ar{s}" for s in SHAPES]:
            assert torch.equal(res[key][0], first[key][0])
    assert 0.5 <= first["timeout"] < 3.0, first["timeout"]
    assert first["after_timeout"] == "CommTimeout"
    assert not _shm_path(name).exists() and not _shm_path(name + "-t").exists()
    assert "resource_tracker" not in capfd.readouterr().err


def _kill_rank_main(rank: int, world: int, port: int, name: str, out_dir: str) -> None:
    device = _join(rank, world, port)
    comm = make_communicator(device, rank, world, shm_name=name, local=True, max_elems=1024, timeout_s=1.0)
    calls, last_ok = 0, time.monotonic()
    try:
        while True:
            comm.all_reduce(torch.ones(576))
            calls += 1
            last_ok = time.monotonic()
            if calls == 200:
                (Path(out_dir) / f"ready{rank}").touch()
    except CommTimeout:
        (Path(out_dir) / f"timeout{rank}").write_text(f"{time.monotonic() - last_ok}")
    os._exit(0)  # the gloo group has a dead member: tearing it down could block


def test_killed_rank_raises_timeout_and_leaks_nothing(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    name, port = _shm_name(), _free_port()
    procs = [ctx.Process(target=_kill_rank_main, args=(r, 2, port, name, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready1").exists():
            assert time.monotonic() < deadline and procs[1].is_alive(), "ranks never got going"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGKILL)  # mid-protocol: both ranks are in the loop
        procs[0].join(30)
        waited = float((tmp_path / "timeout0").read_text())
        assert 1.0 <= waited < 5.0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    cleanup(name)  # what the pool does after its ranks died
    assert not _shm_path(name).exists()


def test_cleanup_removes_a_left_over_segment() -> None:
    name = _shm_name()
    seg = ShmAllReduce.create(name, world_size=2, max_elems=16)
    seg.close()  # a rank 0 that died before unlinking
    assert _shm_path(name).exists()
    assert cleanup(name) is True
    assert not _shm_path(name).exists()
    assert cleanup(name) is False


def test_single_rank_is_identity_without_distributed() -> None:
    comm = make_communicator(Device.resolve("cpu"), 0, 1, shm_name=None, local=True, max_elems=16)
    x = torch.randn(3, 5)
    assert comm.all_reduce(x) is x
    assert comm.all_gather_last_dim(x) is x
    assert comm.broadcast_object("obj") == "obj"
    comm.barrier()
    comm.close()


def test_cpu_device() -> None:
    dev = Device.resolve("auto")
    assert dev == Device.resolve("cpu", rank=3)  # this machine has no CUDA
    assert (dev.kind, dev.dist_backend) == ("cpu", "gloo")
    assert dev.torch_device(1) == torch.device("cpu")
    page = os.sysconf("SC_PAGE_SIZE")
    assert dev.alloc(0).numel() == 0
    for n in (1, 4096, 10_000):
        buf = dev.alloc(n)
        assert buf.dtype == torch.uint8 and buf.numel() == n and buf.data_ptr() % page == 0
        buf.fill_(7)
        assert int(buf.sum()) == 7 * n
    src = torch.arange(16, dtype=torch.float32)
    assert dev.uploader().upload(src) is src  # on CPU a loaded slice is already in place
    dev.synchronize()
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < dev.free_memory_bytes() <= total
    with pytest.raises(ValueError):
        Device.resolve("tpu")


@pytest.mark.slow
def test_bench_allreduce_reports_both_backends() -> None:
    from app.bench.allreduce import bench_allreduce

    result = bench_allreduce(world_size=2, numel=576, iters=50)
    for kind in ("shm", "gloo"):
        assert 0 < result[kind]["median_us"] <= result[kind]["p90_us"]


def _native_rank_main(rank: int, world: int, port: int, name: str, out_dir: str) -> None:
    """The C++ side of the segment (app/kernels/csrc/shm_allreduce.h) beside the Python side."""
    import torch.distributed as dist

    from app.kernels import CpuKernels, available_isas
    from tests.support.layer import random_layer

    device = _join(rank, world, port)
    comm = make_communicator(device, rank, world, shm_name=name, local=True, max_elems=MAX_ELEMS)
    native = comm.native_all_reduce()
    res: dict = {"capacity": (native.capacity, comm._shm.capacity(torch.float32))}
    # Rounds alternate between the two sides, as the embedding (Python) and the layers (C++) do.
    res["mixed"] = []
    for k in range(40):
        x = _input(rank, (LOOP_SIZES[k % 4],), 200 + k)
        (native.all_reduce if k % 3 else comm.all_reduce)(x)
        res["mixed"].append(x)
    for i, shape in enumerate(SHAPES):  # (512, 576) is larger than a slot: several rounds
        x = _input(rank, shape, i)
        native.all_reduce(x)
        res[f"native{shape}"] = x
    # A layer through layer_block (both all-reduces inside) against the same layer as two calls with
    # the Python all-reduce between them; each rank holds its own weights, as shards do.
    kernels = CpuKernels(available_isas()[0], threads=2)
    for dtype in ("fp32", "int8"):
        for rows in (4, 1, 0):
            layer = random_layer(kernels, seed=100 + rank, dtype=dtype, rows=rows)
            x, k_cache, v_cache = layer.fresh()
            y = comm.all_reduce(kernels.attn_block(*layer.attn_args(x, k_cache, v_cache)))
            want = comm.all_reduce(kernels.mlp_block(x, y, layer.o_bias, *layer.mlp_consts))
            x2, k2, v2 = layer.fresh()
            got = kernels.layer_block(*layer.attn_args(x2, k2, v2), layer.o_bias, *layer.mlp_consts, native)
            res[f"fused {dtype} {rows}"] = (torch.equal(got, want), torch.equal(x2, x), got)
    try:  # the ranks disagree on the size: every rank raises, none hangs
        native.all_reduce(torch.ones(3 + rank))
        res["mismatch"] = "no error"
    except ValueError as e:
        res["mismatch"] = str(e)
    comm.close()
    comm.barrier()

    # A peer that never arrives: only rank 0 enters, through the C++ all-reduce and through a layer.
    for what in ("all_reduce", "layer_block"):
        late = make_communicator(
            device, rank, world, shm_name=f"{name}-{what}", local=True, max_elems=4096, timeout_s=0.5
        )
        if rank == 0:
            handle = late.native_all_reduce()
            layer = random_layer(kernels, seed=1)
            x, k_cache, v_cache = layer.fresh()
            start = time.monotonic()
            try:
                if what == "all_reduce":
                    handle.all_reduce(torch.ones(4))
                else:
                    kernels.layer_block(
                        *layer.attn_args(x, k_cache, v_cache), layer.o_bias, *layer.mlp_consts, handle
                    )
                res[what] = None
            except CommTimeout:
                res[what] = time.monotonic() - start
            try:
                handle.all_reduce(torch.ones(4))
                res[f"{what} after"] = "no error"
            except CommTimeout as e:
                res[f"{what} after"] = str(e)
        late.barrier()
        late.close()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not __import__("app.kernels").kernels.available_isas(), reason="KERNELS NOT BUILT")
@pytest.mark.parametrize("world", [2, 3])
def test_native_all_reduce_is_the_python_one_bit_for_bit(world: int, tmp_path: Path) -> None:
    name = _shm_name()
    mp.spawn(_native_rank_main, args=(world, _free_port(), name, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for rank, res in enumerate(results):
        assert res["capacity"][0] == res["capacity"][1] >= MAX_ELEMS
        for k, got in enumerate(res["mixed"]):
            assert torch.equal(got, _ordered_sum(world, (LOOP_SIZES[k % 4],), 200 + k)), (rank, k)
        for i, shape in enumerate(SHAPES):
            assert torch.equal(res[f"native{shape}"], _ordered_sum(world, shape, i)), (rank, shape)
        for key in [k for k in res if k.startswith("fused ")]:
            equal, x_equal, got = res[key]
            assert equal and x_equal, (rank, key)
            assert torch.equal(got, results[0][key][2])  # and the same bits on every rank
        assert "numel differs across ranks" in res["mismatch"]
    first = results[0]
    for what in ("all_reduce", "layer_block"):
        assert 0.5 <= first[what] < 3.0, (what, first[what])
        assert "unusable after" in first[f"{what} after"]
    assert not _shm_path(name).exists()
