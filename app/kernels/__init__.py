"""shardserve's own CPU kernels (the C++ extension `app.kernels._C`) and the choice of compute path.

Why our own kernels: a row's result must not depend on its batch (batched equals alone, bitwise),
and no library promises that: MKL's sgemm rounds a row differently by M, and how differently
depends on the CPU it runs on. Every kernel in csrc/ fixes the reduction order of each output
(csrc/kernels_impl.h), and its AVX2 and AVX-512 builds compute the same arithmetic lane for lane.

The path (`--kernels`, SHARDSERVE_KERNELS): `auto` takes the best ISA build this CPU runs
(avx512vnni, else avx512, else avx2) and falls back to the torch path when the extension was not
built (no compiler, not x86-64); `avx512vnni` / `avx512` / `avx2` force one build; `torch` is the
reference path (app/layers' torch code).

The arithmetic follows the CPU flags, never a timing: avx512vnni multiplies int8 weights by int8
activations (quantized per row in blocks of 32, as llama.cpp's Q8_0; exact int32 sums), where the
other builds widen int8 weights to fp32 and keep fp32 activations; every other weight dtype computes
the same in all three builds. On the default model int8 activations cost 4.4% relative logit error
against 3.3% (BENCHMARKS.md); `--kernels avx512` keeps fp32 activations on such a CPU.
"""

from __future__ import annotations

from types import ModuleType

import torch


def extension() -> ModuleType | None:
    """The compiled extension, or None when this install has none."""
    try:
        from app.kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def available_isas() -> list[str]:
    """ISA builds this CPU (and OS) can run, best first; empty without the extension."""
    ext = extension()
    return list(ext.cpu_isas()) if ext is not None else []


class KernelUnavailable(ValueError):
    pass


def resolve(choice: str) -> str:
    """The path that `choice` means on this machine: 'avx512vnni', 'avx512', 'avx2' or 'torch'."""
    if choice == "torch":
        return "torch"
    isas = available_isas()
    if choice == "auto":
        return isas[0] if isas else "torch"
    if choice not in isas:
        why = "the extension is not built" if extension() is None else "this CPU cannot run it"
        raise KernelUnavailable(f"--kernels {choice}: {why} (available: {', '.join(isas) or 'torch only'})")
    return choice


def describe(choice: str) -> str:
    """One line for the start-up log, /version and `shardserve inspect`."""
    path = resolve(choice)
    if path == "avx512vnni":
        return f"{path} kernels (app.kernels._C; int8 weights x int8 activations)"
    if path != "torch":
        return f"{path} kernels (app.kernels._C)"
    if choice == "torch":
        return "torch (reference path, chosen by --kernels torch)"
    return "torch (the C++ kernels are not built in this install)"


class CpuKernels:
    """One rank's kernels: an ISA build and its team of threads (alive as long as this object).

    Activations are fp32 (made contiguous here); every method returns a new tensor, except kv_write,
    which writes into the caches it is given, and the fused blocks, which also add their residual
    into x in place."""

    def __init__(self, isa: str, threads: int, spin_us: int = 200) -> None:
        ext = extension()
        if ext is None:
            raise KernelUnavailable("the C++ kernels are not built in this install")
        self._k = ext.Kernels(isa, max(1, threads), spin_us)
        self.isa: str = isa
        self.threads: int = self._k.threads

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        n = weight.shape[0] * weight.shape[2] if weight.dim() == 4 else weight.shape[0]  # packed int8
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        self._k.linear(x.contiguous(), weight, scale, out)
        return out

    def norm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        self._k.norm(x, weight, bias, eps, out)
        return out

    def kv_write(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        self._k.kv_write(k.contiguous(), v.contiguous(), slots, k_cache, v_cache)

    @staticmethod
    def kv_views(
        blocks: torch.Tensor, kv_heads: int, head_dim: int, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's KV storage [2, blocks, block_size * kv_heads * head_dim] in the kernels' layout:
        K [blocks, kv_heads, head_dim, block_size] (each block's keys transposed, so attention's
        scores for 16 keys are one vector per element) and V [blocks, kv_heads, block_size, head_dim]."""
        n = blocks.shape[1]
        return (
            blocks[0].view(n, kv_heads, head_dim, block_size),
            blocks[1].view(n, kv_heads, block_size, head_dim),
        )

    # The fused blocks of a Llama layer; arguments as in csrc/bindings.cpp (Kernels::attn_block ...).
    def attn_block(self, *args: object) -> torch.Tensor:
        """[x += residual], RMSNorm, qkv, rotary + KV write, attention, o_proj: one parallel region."""
        return self._k.attn_block(*args)

    def mlp_block(self, *args: object) -> torch.Tensor:
        """[x += residual], RMSNorm, gate_up, silu * up, down: one parallel region."""
        return self._k.mlp_block(*args)

    def add_norm(self, *args: object) -> torch.Tensor:
        """[x += residual], then RMSNorm (bias None) or LayerNorm."""
        return self._k.add_norm(*args)

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        row_seq: torch.Tensor,
        row_len: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        q = q.contiguous()
        out = torch.empty_like(q)
        self._k.attention(q, k_cache, v_cache, tables, row_seq, row_len, block_size, scale, out)
        return out


def load_kernels(choice: str, threads: int) -> CpuKernels | None:
    """The kernels `choice` selects on this machine, or None for the torch path."""
    path = resolve(choice)
    return None if path == "torch" else CpuKernels(path, threads)
