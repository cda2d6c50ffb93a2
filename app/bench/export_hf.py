"""Export a GGUF model as a float32 Hugging Face folder (safetensors, config, tokenizer).

The peers that cannot read our GGUF file get this instead: vLLM's CPU build (no GGUF loader on
CPU) and the naive transformers server. transformers dequantizes the GGUF tensors itself (Q4_1
and friends through gguf-py) and undoes llama.cpp's q/k permutation, so the export is the same
model llama.cpp serves, in float32.

    python -m app.bench.export_hf MODEL.gguf OUT_DIR"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

DONE = "export-done.json"  # written last: a folder without it is a half-written export


def is_exported(out: Path, gguf: Path) -> bool:
    try:
        return json.loads((out / DONE).read_text())["source"] == str(gguf.resolve())
    except (OSError, ValueError, KeyError):
        return False


def export_fp32(gguf: Path, out: Path) -> Path:
    """Write the float32 export of `gguf` to `out` once; later calls return at once."""
    if is_exported(out, gguf):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _save_plain(model, tmp)
    tok.save_pretrained(tmp)
    (tmp / DONE).write_text(json.dumps({"source": str(gguf.resolve()), "dtype": "float32"}))
    tmp.rename(out)
    return out


def _save_plain(model: object, out: Path) -> None:
    """save_pretrained() refuses a model loaded from GGUF (it counts as quantized), though its
    weights are plain float32 tensors by now: write them and a config without the GGUF marker."""
    from safetensors.torch import save_file

    config = model.config  # type: ignore[attr-defined]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same storage as the embedding: saved once
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]  # vLLM picks its model class by this
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.bench.export_hf", description=__doc__.split("\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    print(export_fp32(a.gguf, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
