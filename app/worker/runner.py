"""StepPlan -> tensors and attention metadata -> one forward -> sampled tokens (rank 0).

The runner owns this rank's model and KV cache. Every rank runs the same forward (the
collectives inside it need all of them); only the driver rank (0) samples and answers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from app.engine.types import SampledToken, StepOutput, StepPlan
from app.layers.attention import build_kernel_metadata, build_spans
from app.model.loader import LoadedModel
from app.model.memory import resident_bytes
from app.settings import LogprobsMode
from app.worker.prompt_scoring import score_prompts
from app.worker.sampler import Sampler


def unpack_bitmask(data: bytes, rows: int) -> torch.Tensor:
    """llguidance's bitmask (int32 words, bit i of word w allows token 32w + i) -> bool [rows, 32 * words]."""
    words = torch.frombuffer(bytearray(data), dtype=torch.int32).view(rows, -1)
    bits = torch.arange(32, dtype=torch.int32)
    return ((words[:, :, None] >> bits) & 1).bool().view(rows, -1)


def allocate_kv(
    loaded: LoadedModel, num_blocks: int, block_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The KV cache of every layer in one allocation, [layers, 2 (K, V), blocks, block_size *
    kv_heads * head_dim], and each layer's (K, V) in the layout of the model's compute path: the
    kernels' (`CpuKernels.kv_views`) or the torch path's [slots, kv_heads, head_dim] (slot = block *
    block_size + offset). On the model's device (`Device.alloc`: on CPU, untouched pages cost no
    memory yet); uninitialised, as attention reads only slots written before."""
    kv_heads, head_dim = loaded.model.kv_shape()
    shape = (loaded.config.num_layers, 2, num_blocks, block_size * kv_heads * head_dim)
    nbytes = math.prod(shape) * dtype.itemsize
    storage = loaded.device.alloc(nbytes).view(dtype).view(shape)
    if loaded.kernels is not None:
        views = [loaded.kernels.kv_views(layer, kv_heads, head_dim, block_size) for layer in storage]
    else:
        views = [
            (layer[0].view(-1, kv_heads, head_dim), layer[1].view(-1, kv_heads, head_dim))
            for layer in storage
        ]
    return storage, views


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        num_blocks: int,
        block_size: int,
        is_driver: bool,
        seed: int = 0,
        kv_dtype: torch.dtype = torch.float32,
        logprobs_mode: LogprobsMode = "raw_logprobs",
    ) -> None:
        self.loaded, self.model = loaded, loaded.model
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv_storage, self.kv_caches = allocate_kv(loaded, num_blocks, block_size, kv_dtype)
        self.sampler = Sampler(loaded.config.vocab_size, seed, logprobs_mode) if is_driver else None

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_storage.numel() * self.kv_storage.element_size()

    def kv_cache_resident_bytes(self) -> int | None:
        """The part of the KV reservation in RAM now (CPU; a device's memory is all taken at once)."""
        if self.kv_storage.device.type != "cpu":
            return self.kv_cache_bytes
        return resident_bytes(self.kv_storage.data_ptr(), self.kv_cache_bytes)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, masks: Callable[[], bytes] | None = None) -> StepOutput | None:
        """masks: on rank 0 of a plan with masked_seq_ids, reads their bitmasks (sent after the plan)."""
        if self.sampler is not None:
            for seq in plan.new_seqs:
                self.sampler.add(seq)
        for src, dst in plan.copy_blocks:
            self.kv_storage[:, :, dst] = self.kv_storage[:, :, src]
        result = StepOutput(plan.step_id, ()) if self.sampler is not None else None
        if plan.chunks:
            result = self._forward(plan, masks)
        if self.sampler is not None:
            for seq_id in plan.finished_seq_ids:
                self.sampler.drop(seq_id)
        return result

    def logits(self, plan: StepPlan) -> torch.Tensor | None:
        """The forward of a plan: logits [sampled chunks, vocab] (every rank computes them: the LM
        head's all-gather is a collective), or None when no chunk samples."""
        return self._sample_logits(plan, self._hidden(plan))

    def _sample_logits(self, plan: StepPlan, hidden: torch.Tensor) -> torch.Tensor | None:
        sample_rows, row = [], 0
        for c in plan.chunks:
            row += len(c.token_ids)
            if c.sample:
                sample_rows.append(row - 1)
        if not sample_rows:
            return None
        return self.model.compute_logits(hidden[torch.tensor(sample_rows)])

    def _hidden(self, plan: StepPlan) -> torch.Tensor:
        ids: list[int] = []
        positions: list[int] = []
        for c in plan.chunks:
            ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
        query_lens = [len(c.token_ids) for c in plan.chunks]
        tables = [c.block_table for c in plan.chunks]
        if self.loaded.kernels is not None:
            starts = [c.start_pos for c in plan.chunks]
            meta = build_kernel_metadata(
                query_lens, starts, tables, self.block_size, self.loaded.kernels, len(ids)
            )
        else:
            ends = [c.start_pos + len(c.token_ids) for c in plan.chunks]
            # batch_invariant: the engine promises batched == alone, bitwise
            meta = build_spans(query_lens, ends, tables, self.block_size, batch_invariant=True)
        return self.model(torch.tensor(ids), torch.tensor(positions), self.kv_caches, meta)

    def _forward(self, plan: StepPlan, masks: Callable[[], bytes] | None) -> StepOutput | None:
        hidden = self._hidden(plan)
        scored = score_prompts(self.model.compute_logits, hidden, plan, self.sampler)
        logits = self._sample_logits(plan, hidden)
        if self.sampler is None:
            return None
        if logits is None:
            return StepOutput(plan.step_id, (), prompt_logprobs=scored)
        sampling = [c for c in plan.chunks if c.sample]
        allowed = None
        if plan.masked_seq_ids:
            assert masks is not None, "a plan with masked sequences needs their masks"
            allowed = dict(
                zip(plan.masked_seq_ids, unpack_bitmask(masks(), len(plan.masked_seq_ids)), strict=True)
            )
        tokens: list[SampledToken] = self.sampler.sample(
            logits, [c.seq_id for c in sampling], [c.num_output_tokens for c in sampling], allowed
        )
        return StepOutput(plan.step_id, tuple(tokens), prompt_logprobs=scored)
