"""The C++ kernels (app/kernels) against torch references, on every ISA build this CPU runs.

References are computed in float64 from the same inputs, so tolerances are the kernels' own
rounding; the promises the kernels make by construction are checked bitwise: a row alone equals
the same row at every place in every batch, 1 thread equals 2, and the AVX2 build equals the
AVX-512 one (the same arithmetic lane for lane; so does the AVX-512 VNNI build, except for int8
weights, where it takes int8 activations: checked against a reference of that arithmetic)."""

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


def _pack(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> the kernels' packed [N / 4, K / 16, 4, 16]: four outputs' 16-element blocks."""
    n, k = q.shape
    return q.view(n // 4, 4, k // 16, 16).transpose(1, 2).contiguous()


def _int8_activations_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What avx512vnni computes, in float64 from the quantized values: x per row in blocks of 16,
    d = max|x| / 127, x_q = round_half_even(x * (1 / d)) (fp32, as the kernel), exact integer dot
    products scaled by d, then by the weight's scale."""
    out = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float64)
    for b0 in range(0, x.shape[1], 16):
        xb = x[:, b0 : b0 + 16]
        d = xb.abs().amax(1, keepdim=True) / 127
        xq = torch.round(xb * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
        assert xq.abs().max() <= 127
        out += d.double() * (xq.double() @ q[:, b0 : b0 + 16].double().T)
    return out * scale.double()


def _arithmetic(isa: str, dtype: torch.dtype) -> str:
    """Builds that promise bitwise equal results share a name: all of them, except that avx512vnni
    takes int8 activations for (packed) int8 weights."""
    return "int8 activations" if isa == "avx512vnni" and dtype == torch.int8 else "fp32 activations"


@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (7, 592, 36), (70, 1536, 64), (16, 64, 4)])
def test_packed_int8_linear_on_every_build(kernels, m, k, n):
    """Packed int8 weights: fp32 activations (avx2, avx512) against float64, int8 activations
    (avx512vnni) against their own float64 reference; a row alone equals the row in any batch."""
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4  # uneven feature scales
    x[0, :16] = 0.0  # an all-zero block: d = 0
    q, scale = _weight(n, k, torch.int8, g)
    y = kernels.linear(x, _pack(q), scale)
    if kernels.isa == "avx512vnni":
        ref = _int8_activations_reference(x, q, scale)
        tol = 2e-6 * ref.abs().max().item() * math.sqrt(k / 16)
    else:
        ref = x.double() @ q.double().T * scale.double()
        tol = 1e-5 * ref.abs().max().item() * math.sqrt(k)
    assert (y.double() - ref).abs().max().item() <= tol
    for i in range(m):
        assert torch.equal(kernels.linear(x[i : i + 1], _pack(q), scale)[0], y[i])
    shuffled = torch.cat([torch.randn(3, k, generator=g), x.flip(0)])
    assert torch.equal(kernels.linear(shuffled, _pack(q), scale)[3:].flip(0), y)


def test_thread_count_and_isa_do_not_change_a_bit():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 1024, generator=g)
    results = []
    for isa in ISAS:
        for threads in (1, 2, 3):
            k = CpuKernels(isa, threads)
            for dtype in WEIGHT_DTYPES:
                w, scale = _weight(76, 1024, dtype, torch.Generator().manual_seed(6))
                if dtype == torch.int8:
                    results.append((dtype, _arithmetic(isa, dtype), "packed", k.linear(x, _pack(w), scale)))
                results.append((dtype, _arithmetic(isa, torch.float32), "plain", k.linear(x, w, scale)))
    for key in {r[:3] for r in results}:
        same = [r[3] for r in results if r[:3] == key]
        assert len(same) >= 3 and all(torch.equal(same[0], y) for y in same[1:]), key


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


def _kernel_layout(k_slots, v_slots, block):
    """Caches [slots, Hkv, D] in the kernels' layout: K [blocks, Hkv, D, block], V [blocks, Hkv, block, D]."""
    n, hkv, d = k_slots.shape
    k = k_slots.view(n // block, block, hkv, d).permute(0, 2, 3, 1).contiguous()
    v = v_slots.view(n // block, block, hkv, d).permute(0, 2, 1, 3).contiguous()
    return k, v


def _slot_layout(k_cache, v_cache):
    """The inverse of _kernel_layout."""
    blocks, hkv, d, block = k_cache.shape
    return (
        k_cache.permute(0, 3, 1, 2).reshape(blocks * block, hkv, d),
        v_cache.permute(0, 2, 1, 3).reshape(blocks * block, hkv, d),
    )


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "hq,hkv,d,block",
    [
        (9, 3, 64, 16),
        (4, 2, 16, 16),
        (4, 4, 20, 16),
        (6, 1, 128, 16),
        (2, 1, 8, 16),
        (9, 3, 64, 24),
        (4, 2, 20, 5),
    ],
)
def test_attention_matches_float64_reference_in_place_over_paged_blocks(kernels, kv_dtype, hq, hkv, d, block):
    g = torch.Generator().manual_seed(hq * 100 + d)
    per_seq = 640 // block + 1  # up to 640 positions: rows of one to three 256-key partitions
    num_blocks = 3 * per_seq + 7
    k_slots = torch.randn(num_blocks * block, hkv, d, generator=g).to(kv_dtype)
    v_slots = torch.randn(num_blocks * block, hkv, d, generator=g).to(kv_dtype)
    k_cache, v_cache = _kernel_layout(k_slots, v_slots, block)
    # three sequences over scattered blocks; rows: a prefill chunk mid-sequence, decode rows, a
    # context ending mid-block, a padding row (length 0), a 1-position row, rows either side of a
    # partition boundary and rows of several partitions
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    tables = torch.stack([perm[i * per_seq : (i + 1) * per_seq] for i in range(3)])
    row_seq = torch.tensor([0, 0, 0, 1, 2, 2, 0, 1, 1, 1, 2, 0, 2], dtype=torch.int32)
    row_len = torch.tensor([37, 38, 39, 160, 1, 17, 0, 100, 256, 257, 512, 600, 640], dtype=torch.int32)
    q = torch.randn(len(row_seq), hq, d, generator=g)
    scale = d**-0.5
    out = kernels.attention(q, k_cache, v_cache, tables, row_seq, row_len, block, scale)
    ref = _reference_attention(q, k_slots, v_slots, tables, row_seq, row_len, block, scale)
    assert (out.double() - ref).abs().max().item() < 2e-6
    assert torch.all(out[6] == 0)
    for t in range(len(row_seq)):  # each row alone
        alone = kernels.attention(
            q[t : t + 1], k_cache, v_cache, tables, row_seq[t : t + 1], row_len[t : t + 1], block, scale
        )
        assert torch.equal(alone[0], out[t])


def test_attention_refuses_positions_outside_the_cache(kernels):
    k_cache, v_cache = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 16, 8)  # 2 blocks of 16 slots
    q = torch.zeros(1, 1, 8)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.attention(q, k_cache, v_cache, torch.tensor([[5]], dtype=torch.int32), one - 1, one, 16, 1.0)
    with pytest.raises(RuntimeError, match="past its table"):
        kernels.attention(
            q, k_cache, v_cache, torch.tensor([[0]], dtype=torch.int32), one - 1, one * 17, 16, 1.0
        )
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.kv_write(q, q, torch.tensor([32]), k_cache, v_cache)
    with pytest.raises(RuntimeError, match="the KV cache must be"):  # the slot layout of the torch path
        kernels.attention(
            q,
            torch.zeros(32, 1, 8),
            torch.zeros(32, 1, 8),
            torch.tensor([[0]], dtype=torch.int32),
            one - 1,
            one,
            16,
            1.0,
        )
    wide_k, wide_v = torch.zeros(2, 1, 272, 16), torch.zeros(2, 1, 16, 272)  # head_dim past the accumulators
    with pytest.raises(RuntimeError, match="head_dim above 256"):
        kernels.attention(
            torch.zeros(1, 1, 272),
            wide_k,
            wide_v,
            torch.tensor([[0]], dtype=torch.int32),
            one - 1,
            one,
            16,
            1.0,
        )


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=str)
def test_kv_write_stores_rows_at_their_slots_and_skips_padding(kernels, kv_dtype):
    k, v = torch.randn(4, 3, 20), torch.randn(4, 3, 20)
    k_cache, v_cache = torch.zeros(4, 3, 20, 16, dtype=kv_dtype), torch.zeros(4, 3, 16, 20, dtype=kv_dtype)
    kernels.kv_write(k, v, torch.tensor([5, 63, -1, 0]), k_cache, v_cache)
    k_slots, v_slots = _slot_layout(k_cache, v_cache)
    for row, slot in ((0, 5), (1, 63), (3, 0)):
        assert torch.equal(k_slots[slot], k[row].to(kv_dtype)) and torch.equal(
            v_slots[slot], v[row].to(kv_dtype)
        )
    assert int((k_slots != 0).any(dim=(1, 2)).sum()) == 3 and int((v_slots != 0).any(dim=(1, 2)).sum()) == 3


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
    for isa in ("avx512vnni", "avx512", "avx2"):
        if isa in ISAS:
            assert resolve(isa) == isa
        else:
            with pytest.raises(KernelUnavailable, match="cannot run"):
                resolve(isa)


def test_empty_batches(kernels):
    w, scale = _weight(8, 32, torch.int8, torch.Generator().manual_seed(0))
    assert kernels.linear(torch.zeros(0, 32), w, scale).shape == (0, 8)
    none = torch.zeros(0, dtype=torch.int32)
    k_cache, v_cache = torch.zeros(2, 1, 8, 16), torch.zeros(2, 1, 16, 8)
    out = kernels.attention(
        torch.zeros(0, 2, 8), k_cache, v_cache, torch.zeros(1, 2, dtype=torch.int32), none, none, 16, 1.0
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
