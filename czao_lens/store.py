"""ActivationStore: the one cached-activation store every diagnostic and steering method reads.

Entries are keyed by (model fingerprint, token ids, hook name) and hold the activation of one
prompt at every position, ``[pos, *width]``. A request computes only what it misses, in one forward
per prompt length that stops after the last block it needs. Memory is bounded in bytes with LRU
eviction; entries can also persist on disk as safetensors (atomic writes), so a second process or
a second session reuses them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from czao_lens.models import model_fingerprint
from czao_lens.perturb import PerturbationError, check_hook_name, hook_layer
from czao_lens.prompts import PromptError, encode_prompts


def _tensor_sha256(t: Tensor) -> str:
    """Checksum of a tensor's dtype, shape and bytes (stored beside each disk entry)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class StoreStats:
    """Counters of a store: ``forward_passes`` counts batched model calls made on misses."""

    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    forward_passes: int = 0
    evictions: int = 0
    bytes_in_memory: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ActivationStore:
    """Cached activations of a model, shared by everything that reads activations.

    >>> store = ActivationStore(model, max_bytes=256 * 2**20)
    >>> acts = store.get(["The capital of France is"], ["blocks.10.hook_resid_pre"])
    >>> acts[0]["blocks.10.hook_resid_pre"].shape  # [pos, d_model]
    """

    def __init__(
        self,
        model: HookedTransformer,
        *,
        max_bytes: int = 512 * 2**20,
        disk_dir: str | Path | None = None,
        batch_size: int = 16,
    ) -> None:
        if max_bytes <= 0:
            raise PerturbationError(f"max_bytes must be positive, got {max_bytes}")
        self.model = model
        self.max_bytes = int(max_bytes)
        self.batch_size = batch_size
        self.fingerprint = model_fingerprint(model)
        self.disk_dir = Path(disk_dir) / self.fingerprint if disk_dir is not None else None
        self.stats = StoreStats()
        self._mem: OrderedDict[tuple[str, str], Tensor] = OrderedDict()

    # -------------------------------------------------------------- public API

    def get(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        hook_names: str | Sequence[str],
        *,
        chat: bool = False,
    ) -> list[dict[str, Float[Tensor, "pos *width"]]]:
        """Activations of each prompt (text, or token ids) at each hook, computing only misses."""
        hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        if not hook_names:
            raise PerturbationError("no hook names requested")
        for h in hook_names:
            check_hook_name(self.model, h)
        rows = self.tokenize(prompts, chat=chat)
        keys = [self._token_key(r) for r in rows]
        out: list[dict[str, Tensor]] = [{} for _ in rows]
        missing: dict[int, list[str]] = {}
        for i, k in enumerate(keys):
            for h in hook_names:
                t = self._lookup(k, h)
                if t is None:
                    missing.setdefault(i, []).append(h)
                else:
                    out[i][h] = t
        if missing:
            self._compute(rows, keys, missing, out)
        return out

    def last_token(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        hook_names: str | Sequence[str],
        *,
        position: int = -1,
        chat: bool = False,
    ) -> dict[str, Float[Tensor, "n *width"]]:
        """Stack one position (default: the last token) of every prompt: ``{hook: [n, *width]}``."""
        hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        per = self.get(prompts, hook_names, chat=chat)
        return {h: torch.stack([p[h][position] for p in per]) for h in hook_names}

    def tokenize(
        self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, chat: bool = False
    ) -> list[list[int]]:
        """Token ids per prompt, encoded exactly as generation encodes them."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise PromptError("empty prompt set")
        if all(isinstance(p, str) for p in prompts):
            enc = encode_prompts(self.model, prompts, chat=chat)
            return [enc.tokens[i, enc.tokens.shape[1] - int(n):].tolist() for i, n in enumerate(enc.prompt_lens)]
        rows = [list(map(int, p)) for p in prompts]
        if any(len(r) == 0 for r in rows):
            raise PromptError("a token-id prompt is empty")
        vocab = self.model.cfg.d_vocab
        if any(not 0 <= t < vocab for r in rows for t in r):
            raise PromptError(f"token ids must lie in [0, {vocab})")
        return rows

    def clear(self) -> None:
        self._mem.clear()
        self.stats.bytes_in_memory = 0

    # -------------------------------------------------------------- internals

    def _token_key(self, row: list[int]) -> str:
        return hashlib.sha1(torch.tensor(row, dtype=torch.int64).numpy().tobytes()).hexdigest()

    def _disk_path(self, tkey: str, hook: str) -> Path | None:
        return None if self.disk_dir is None else self.disk_dir / f"{tkey}.{hook}.safetensors"

    def _lookup(self, tkey: str, hook: str) -> Tensor | None:
        key = (tkey, hook)
        if key in self._mem:
            self._mem.move_to_end(key)
            self.stats.hits += 1
            return self._mem[key]
        path = self._disk_path(tkey, hook)
        if path is not None and path.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    want = (f.metadata() or {}).get("sha256")
                    t = f.get_tensor("act")
                ok = want == _tensor_sha256(t)  # a file edited in place keeps its size; only a checksum tells
            except Exception:  # a damaged file is just a miss; it is rewritten below
                ok = False
            if not ok:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            self.stats.disk_hits += 1
            self._remember(key, t)
            return t
        self.stats.misses += 1
        return None

    def _remember(self, key: tuple[str, str], t: Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes:
            return  # larger than the whole budget: hand it out, keep nothing
        self._mem[key] = t
        self.stats.bytes_in_memory += size
        while self.stats.bytes_in_memory > self.max_bytes:
            _, old = self._mem.popitem(last=False)
            self.stats.bytes_in_memory -= old.numel() * old.element_size()
            self.stats.evictions += 1

    def _persist(self, tkey: str, hook: str, t: Tensor) -> None:
        path = self._disk_path(tkey, hook)
        if path is None:
            return
        from safetensors.torch import save_file

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
        except OSError as exc:  # read-only or full: keep working from memory, say so once
            warnings.warn(f"czao-lens: cannot write the activation store's disk cache {path.parent} ({exc}); "
                          "keeping activations in memory only.")
            self.disk_dir = None
            return
        try:
            t = t.contiguous()
            save_file({"act": t}, tmp, metadata={"sha256": _tensor_sha256(t)})
            os.replace(tmp, path)  # readers see the old file or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @torch.no_grad()
    def _compute(
        self,
        rows: list[list[int]],
        keys: list[str],
        missing: dict[int, list[str]],
        out: list[dict[str, Tensor]],
    ) -> None:
        model = self.model
        # Group prompts by length (no padding, so values are exact) and by the hooks they miss.
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, hooks in missing.items():
            groups.setdefault((len(rows[i]), tuple(sorted(hooks))), []).append(i)
        device = model.cfg.device or "cpu"
        for (_, hooks), idx in groups.items():
            last = max(hook_layer(model, h) for h in hooks)
            needs_final = last >= model.cfg.n_layers
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                toks = torch.tensor([rows[i] for i in chunk], dtype=torch.long, device=device)
                got: dict[str, Tensor] = {}

                def save(act: Tensor, hook) -> None:
                    got[hook.name] = act.detach().cpu()

                fwd = [(h, save) for h in hooks]
                kwargs = {} if needs_final else {"stop_at_layer": last + 1}
                # An explicit mask: TL would otherwise treat leading pad-id tokens as padding.
                with model.hooks(fwd_hooks=fwd):
                    model(toks, attention_mask=torch.ones_like(toks), **kwargs)
                self.stats.forward_passes += 1
                for j, i in enumerate(chunk):
                    for h in hooks:
                        t = got[h][j].clone()
                        out[i][h] = t
                        self._remember((keys[i], h), t)
                        self._persist(keys[i], h, t)
