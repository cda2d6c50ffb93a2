"""The C++ kernels (app/kernels) against torch references, on every ISA build this CPU runs.

References are computed in float64 from the same inputs, so tolerances are the kernels' own
rounding; the promises the kernels make by construction are checked bitwise: a row alone equals
the same row at every place in every batch, 1 thread equals 2, and the AVX2 build equals the
AVX-512 one (the same arithmetic lane for lane)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from app.kernels import CpuKernels, KernelUnavailable, available_isas, describe, resolve

ISAS = available_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="KERNELS NOT BUILT: the C++ extension is missing")

WEIGHT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8]


@pytest.fixture(scope="module", params=ISAS)
def kernels(request) -> CpuKernels:
    return CpuKernels(request.param, threads=2)


def _weight(
    n: int, k: int, dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.randn(n, k, generator=g)
    if dtype == torch.int8:
        return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(
            n, generator=g
        ) + 0.01
    return w.to(dtype), None


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,k,n", [(1, 576, 960), (7, 577, 33), (16, 64, 3), (5, 17, 9), (70, 100, 50), (3, 15, 1)]
)
def test_linear_matches_float64_and_rows_do_not_depend_on_the_batch(kernels, dtype, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    w, scale = _weight(n, k, dtype, g)
    y = kernels.linear(x, w, scale)
    ref = x.double() @ w.double().T * (scale.double() if scale is not None else 1.0)
    tol = 1e-5 * ref.abs().max().item() * math.sqrt(k)
    assert (y.double() - ref).abs().max().item() <= tol
    for i in range(m):  # the row alone, and inside a batch of other rows at another place
        assert torch.equal(kernels.linear(x[i : i + 1], w, scale)[0], y[i])
    shuffled = torch.cat([torch.randn(3, k, generator=g), x.flip(0)])
    assert torch.equal(kernels.linear(shuffled, w, scale)[3:].flip(0), y)


def test_thread_count_and_isa_do_not_change_a_bit():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 1000, generator=g)
    results = []
    for isa in ISAS:
        for threads in (1, 2, 3):
            k = CpuKernels(isa, threads)
            for dtype in WEIGHT_DTYPES:
                w, scale = _weight(77, 1000, dtype, torch.Generator().manual_seed(6))
                results.append((dtype, k.linear(x, w, scale)))
    for dtype in WEIGHT_DTYPES:
        same = [y for d, y in results if d == dtype]
        assert all(torch.equal(same[0], y) for y in same[1:]), dtype


def _reference_attention(q, k_cache, v_cache, tables, row_seq, row_len, block, scale):
    """Each row over its own positions, as the decode step at that position: SDPA in float64."""
    out = torch.zeros_like(q, dtype=torch.float64)
    groups = q.shape[1] // k_cache.shape[1]
    for t in range(q.shape[0]):
        n = int(row_len[t])
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = tables[row_seq[t]].long()[pos // block] * block + pos % block
        k = k_cache[slots].double().repeat_interleave(groups, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = v_cache[slots].double().repeat_interleave(groups, dim=1).transpose(0, 1)
        att = torch.softmax((q[t].double()[:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)  # [Hq, 1, n]
        out[t] = (att @ v)[:, 0]
    return out


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 2, 16), (4, 4, 20), (6, 1, 128), (2, 1, 8)])
def test_attention_matches_float64_reference_in_place_over_paged_blocks(kernels, kv_dtype, hq, hkv, d):
    g = torch.Generator().manual_seed(hq * 100 + d)
    block, num_blocks = 16, 40
    k_cache = torch.randn(num_blocks * block, hkv, d, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks * block, hkv, d, generator=g).to(kv_dtype)
    # three sequences over scattered blocks; rows: a prefill chunk mid-sequence, decode rows, a
    # context ending mid-block, a padding row (length 0), a 1-position row
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.stack([perm[0:10], perm[10:20], perm[20:30]])
    row_seq = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1], dtype=torch.int32)
    row_len = torch.tensor([37, 38, 39, 160, 1, 17, 0, 100], dtype=torch.int32)
    q = torch.randn(len(row_seq), hq, d, generator=g)
    scale = d**-0.5
    out = kernels.attention(q, k_cache, v_cache, tables, row_seq, row_len, block, scale)
    ref = _reference_attention(q, k_cache, v_cache, tables, row_seq, row_len, block, scale)
    assert (out.double() - ref).abs().max().item() < 2e-6
    assert torch.all(out[6] == 0)
    for t in range(len(row_seq)):  # each row alone
        alone = kernels.attention(
            q[t : t + 1], k_cache, v_cache, tables, row_seq[t : t + 1], row_len[t : t + 1], block, scale
        )
        assert torch.equal(alone[0], out[t])


def test_attention_refuses_positions_outside_the_cache(kernels):
    cache = torch.zeros(32, 1, 8)
    q = torch.zeros(1, 1, 8)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.attention(q, cache, cache, torch.tensor([[5]], dtype=torch.int32), one - 1, one, 16, 1.0)
    with pytest.raises(RuntimeError, match="past its table"):
        kernels.attention(q, cache, cache, torch.tensor([[0]], dtype=torch.int32), one - 1, one * 17, 16, 1.0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.kv_write(q, q, torch.tensor([32]), cache, cache)
    wide = torch.zeros(32, 1, 272)  # head_dim past what the kernel's accumulators hold
    with pytest.raises(RuntimeError, match="head_dim above 256"):
        kernels.attention(
            torch.zeros(1, 1, 272), wide, wide, torch.tensor([[0]], dtype=torch.int32), one - 1, one, 16, 1.0
        )


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=str)
def test_kv_write_stores_rows_at_their_slots_and_skips_padding(kernels, kv_dtype):
    k, v = torch.randn(4, 3, 20), torch.randn(4, 3, 20)
    k_cache, v_cache = torch.zeros(64, 3, 20, dtype=kv_dtype), torch.zeros(64, 3, 20, dtype=kv_dtype)
    kernels.kv_write(k, v, torch.tensor([5, 63, -1, 0]), k_cache, v_cache)
    for row, slot in ((0, 5), (1, 63), (3, 0)):
        assert torch.equal(k_cache[slot], k[row].to(kv_dtype)) and torch.equal(
            v_cache[slot], v[row].to(kv_dtype)
        )
    assert int((k_cache != 0).any(dim=(1, 2)).sum()) == 3


@pytest.mark.parametrize("h", [576, 64, 72, 17])
def test_norms_match_torch(kernels, h):
    g = torch.Generator().manual_seed(h)
    x, w, b = torch.randn(6, h, generator=g) * 3, torch.randn(h, generator=g), torch.randn(h, generator=g)
    rms = kernels.norm(x, w, None, 1e-5)
    ref = w.double() * (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5))
    assert (rms.double() - ref).abs().max().item() < 1e-5
    ln = kernels.norm(x, w, b, 1e-5)
    assert torch.allclose(ln, F.layer_norm(x, (h,), w, b, 1e-5), atol=1e-5)
    for i in range(6):
        assert torch.equal(kernels.norm(x[i : i + 1], w, None, 1e-5)[0], rms[i])
        assert torch.equal(kernels.norm(x[i : i + 1], w, b, 1e-5)[0], ln[i])


def test_the_choice_of_path():
    assert resolve("torch") == "torch" and describe("torch").startswith("torch")
    assert resolve("auto") == ISAS[0] and describe("auto").startswith(ISAS[0])
    for isa in ("avx512", "avx2"):
        if isa in ISAS:
            assert resolve(isa) == isa
        else:
            with pytest.raises(KernelUnavailable, match="cannot run"):
                resolve(isa)


def test_empty_batches(kernels):
    w, scale = _weight(8, 32, torch.int8, torch.Generator().manual_seed(0))
    assert kernels.linear(torch.zeros(0, 32), w, scale).shape == (0, 8)
    cache = torch.zeros(32, 1, 8)
    none = torch.zeros(0, dtype=torch.int32)
    out = kernels.attention(
        torch.zeros(0, 2, 8), cache, cache, torch.zeros(1, 2, dtype=torch.int32), none, none, 16, 1.0
    )
    assert out.shape == (0, 2, 8)
    assert kernels.norm(torch.zeros(0, 32), torch.ones(32), None, 1e-5).shape == (0, 32)


def test_fused_mlp_block_equals_its_parts(kernels):
    """mlp_block = residual add, RMSNorm, gate_up, silu * up, down: against torch doing the same."""
    g = torch.Generator().manual_seed(3)
    x, resid = torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    norm_w = torch.rand(64, generator=g) + 0.5
    gu, down = torch.randn(2 * 48, 64, generator=g) * 0.1, torch.randn(64, 48, generator=g) * 0.1
    x_in = x.clone()
    y = kernels.mlp_block(x, resid, None, norm_w, 1e-5, gu, None, None, down, None)
    assert torch.equal(x, x_in + resid)  # the residual was added in place
    h = norm_w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    gate, up = F.linear(h, gu).chunk(2, dim=-1)
    assert torch.allclose(y, F.linear(F.silu(gate) * up, down), atol=1e-5)
    for i in range(5):  # and each row alone
        xi = x_in[i : i + 1].clone()
        yi = kernels.mlp_block(xi, resid[i : i + 1].clone(), None, norm_w, 1e-5, gu, None, None, down, None)
        assert torch.equal(yi[0], y[i])
