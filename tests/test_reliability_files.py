"""Untrusted files: every loader fed crafted files gives a clear error; nothing is unpickled or executed.

Loaders: ``artifacts.load`` (steering vectors, activation scaling, CAST, A-LQR, block Jacobians, ridge
maps), SAEs from disk (``sae.load_sae``), GGUF control vectors (``SteeringVector.from_gguf``). Files:
wrong shapes and dtypes, edited ``cfg.json``, a safetensors header that claims huge sizes, a file
made for another model, a pickle (and a ``torch.save`` file) under a ``.safetensors`` / ``.gguf``
name whose unpickling would leave a marker file behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from czao_lens import artifacts
from czao_lens.artifacts import model_info
from czao_lens.czao import ZPredictor
from czao_lens.errors import CzaoLensError
from czao_lens.sae import load_sae
from czao_lens.steering import SteeringVector
from czao_lens.steering.cast import CAST, fit_condition
from czao_lens.steering.lqr import block_jacobians, fit_alqr
from czao_lens.steering.sae import make_sae
from czao_lens.steering.scaling import ActivationScaling

EXAMPLES = int(os.environ.get("CZAO_LENS_HYPOTHESIS_EXAMPLES", "0")) or None
POS = ["I love this wonderful day", "What a great and happy result"]
NEG = ["I hate this awful day", "What a terrible and sad result"]
MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"czao-lens-unpickled-{os.getpid()}"


class _Bomb:
    """Unpickling this runs code: it creates MARKER. A loader that unpickles is caught by the marker."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


def _pickle_bytes() -> bytes:
    return pickle.dumps({"weights": _Bomb()})


def _torch_save_bytes(tmp: Path) -> bytes:
    p = tmp / "t.pt"
    torch.save({"w": torch.ones(3), "bomb": _Bomb()}, p)
    return p.read_bytes()


def _huge_header_safetensors() -> bytes:
    """A header that claims a tensor of 2^40 floats in a file of a few bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def _huge_length_prefix() -> bytes:
    return struct.pack("<Q", 1 << 62) + b"{}"


CRAFTED = {
    "pickle": lambda tmp: _pickle_bytes(),
    "torch.save": _torch_save_bytes,
    "huge header sizes": lambda tmp: _huge_header_safetensors(),
    "huge length prefix": lambda tmp: _huge_length_prefix(),
    "empty": lambda tmp: b"",
    "truncated": lambda tmp: None,  # filled per artifact: its own file cut in half
    "text": lambda tmp: b"not a tensor file at all\n",
}


@pytest.fixture(autouse=True)
def _no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), "a loader unpickled (and so executed) a crafted file"


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """One real saved folder per artifact type, fitted on the tiny model."""
    root = tmp_path_factory.mktemp("artifacts")
    d = tiny.cfg.d_model
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({1: torch.randn(d, generator=g)}, "resid_pre", {})
    jac = block_jacobians(tiny, prompts=POS + NEG, cache_dir=None)
    objs = {
        "steering_vector": vec,
        "activation_scaling": ActivationScaling(["blocks.1.hook_mlp_out"], torch.tensor([0.5])),
        "cast": CAST(fit_condition(tiny, POS, NEG, 1), SteeringVector({2: torch.randn(d, generator=g)}, "resid_pre", {}), 2.0),
        "alqr": fit_alqr(tiny, jac, pos_texts=POS, neg_texts=NEG, lam=2.0),
        "block_jacobians": jac,
        "z_predictor": ZPredictor.fit(torch.randn(12, d, generator=g), torch.randn(12, 4, generator=g), model=model_info(tiny),
                                      hooks=["blocks.1.hook_resid_pre"]),
    }
    return {k: o.save(root / k) for k, o in objs.items()}


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def test_saved_artifacts_round_trip(saved, tiny):
    for kind, path in saved.items():
        obj = artifacts.load(path, tiny)
        assert type(obj).ARTIFACT_TYPE == kind


@pytest.mark.parametrize("crafted", list(CRAFTED))
def test_crafted_tensor_files_are_refused(saved, tiny, tmp_path, crafted):
    for kind, src in saved.items():
        dst = _copy(src, tmp_path / kind)
        data = CRAFTED[crafted](tmp_path)
        if data is None:
            full = (src / artifacts.TENSORS_FILE).read_bytes()
            data = full[: len(full) // 2]
        (dst / artifacts.TENSORS_FILE).write_bytes(data)
        with pytest.raises(CzaoLensError, match="safetensors"):
            artifacts.load(dst, tiny)


def test_file_made_for_another_model_is_refused(saved, tiny, tmp_path):
    for kind, src in saved.items():
        dst = _copy(src, tmp_path / kind)
        cfg = json.loads((dst / artifacts.CFG_FILE).read_text())
        if not cfg.get("model"):
            continue  # objects that record no model (none today) cannot be checked
        cfg["model"]["fingerprint"] = "0123456789abcdef"
        (dst / artifacts.CFG_FILE).write_text(json.dumps(cfg))
        with pytest.raises(CzaoLensError, match="fingerprint"):
            artifacts.load(dst, tiny)
        cfg["model"]["d_model"] = tiny.cfg.d_model + 1
        (dst / artifacts.CFG_FILE).write_text(json.dumps(cfg))
        with pytest.raises(CzaoLensError, match="d_model"):
            artifacts.load(dst, tiny)


# Mutations of a real saved object: each must load as a working object or raise CzaoLensError.
DTYPES = [torch.float16, torch.float64, torch.int64, torch.int8, torch.bool, torch.bfloat16]
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=5,
)


@st.composite
def mutations(draw):
    what = draw(st.sampled_from(["shape", "dtype", "drop", "extra", "param", "type", "sites", "nan", "scalar"]))
    return what, draw(st.integers(0, 1000)), draw(JSONISH), draw(st.sampled_from(DTYPES))


def test_mutated_artifacts_load_or_fail_clearly(saved, tiny, tmp_path):
    kinds = sorted(saved)
    tried = set()

    @settings(max_examples=max(EXAMPLES or 0, 60), deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(kinds), m=mutations())
    def check(kind, m):
        what, k, value, dtype = m
        dst = _copy(saved[kind], tmp_path / "m")
        tensors = load_file(str(dst / artifacts.TENSORS_FILE))
        cfg = json.loads((dst / artifacts.CFG_FILE).read_text())
        name = sorted(tensors)[k % len(tensors)]
        t = tensors[name]
        if what == "shape":
            tensors[name] = torch.zeros(*(s + 1 + k % 3 for s in t.shape)) if t.ndim else torch.zeros(2)
        elif what == "dtype":
            tensors[name] = t.to(dtype)
        elif what == "drop":
            del tensors[name]
        elif what == "extra":
            tensors["unexpected"] = torch.zeros(3)
        elif what == "nan" and t.is_floating_point() and t.numel():
            tensors[name] = t.clone().reshape(-1).index_fill(0, torch.tensor([k % t.numel()]), float("nan")).reshape(t.shape)
        elif what == "scalar":
            tensors[name] = torch.tensor(1.0)
        elif what == "param" and cfg["params"]:
            key = sorted(cfg["params"])[k % len(cfg["params"])]
            cfg["params"][key] = value
        elif what == "type":
            cfg["type"] = artifacts.artifact_types()[k % len(artifacts.artifact_types())]
        elif what == "sites":
            cfg["sites"] = value
        tried.add(f"{kind}:{what}:{name}:{k % 7}:{json.dumps(value)[:40]}:{dtype}")
        save_file({n: v.contiguous() for n, v in tensors.items()}, str(dst / artifacts.TENSORS_FILE)) if tensors else \
            (dst / artifacts.TENSORS_FILE).write_bytes(struct.pack("<Q", 2) + b"{}")
        (dst / artifacts.CFG_FILE).write_text(json.dumps(cfg))
        try:
            obj = artifacts.load(dst, tiny)
        except CzaoLensError as exc:
            assert str(exc).strip()
            return
        # It loaded: an intervention must attach and run cleanly, or refuse with a clear error.
        if hasattr(obj, "apply"):
            try:
                with obj.apply(tiny):
                    out = tiny(tiny.to_tokens("a b c", prepend_bos=False))
                assert torch.isfinite(out).all(), f"{kind} with {what} on {name} gave non-finite logits"
            except CzaoLensError:
                pass
        assert not any(hp.fwd_hooks for hp in tiny.hook_dict.values())

    check()
    assert len(tried) >= min(40, EXAMPLES or 40) // 2


# ----------------------------------------------------------------------------- SAEs from disk


def test_crafted_sae_folders_are_refused(tiny, tmp_path):
    good = tmp_path / "good"
    make_sae(tiny.cfg.d_model, 64, "blocks.1.hook_resid_pre").save_model(str(good))
    load_sae(good)  # the real one loads
    weights = next(good.glob("*.safetensors")).name
    cases = {
        "pickle weights": lambda d: (d / weights).write_bytes(_pickle_bytes()),
        "torch.save weights": lambda d: (d / weights).write_bytes(_torch_save_bytes(tmp_path)),
        "huge header": lambda d: (d / weights).write_bytes(_huge_header_safetensors()),
        "truncated weights": lambda d: (d / weights).write_bytes((good / weights).read_bytes()[:100]),
        "cfg not json": lambda d: (d / "cfg.json").write_text("{not json"),
        "cfg wrong types": lambda d: (d / "cfg.json").write_text(json.dumps({"d_in": "wide", "d_sae": -3})),
        "cfg empty": lambda d: (d / "cfg.json").write_text("{}"),
        "no cfg": lambda d: (d / "cfg.json").unlink(),
    }
    for what, craft in cases.items():
        d = _copy(good, tmp_path / "bad")
        craft(d)
        with pytest.raises(CzaoLensError):
            load_sae(d)
    with pytest.raises(CzaoLensError, match="not an SAELens SAE folder"):
        load_sae(good / weights)


# ----------------------------------------------------------------------------- GGUF control vectors


def test_crafted_gguf_control_vectors_are_refused(tiny, tmp_path):
    d = tiny.cfg.d_model
    good = SteeringVector({1: torch.randn(d)}, "resid_post", {}).to_gguf(tmp_path / "good.gguf")
    assert SteeringVector.from_gguf(good, model=tiny).layers == [1]

    import gguf

    def writer(path, arch="controlvector", tensors=()):
        w = gguf.GGUFWriter(str(path), arch)
        for name, arr in tensors:
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    import numpy as np

    raw = good.read_bytes()
    cases = {
        "pickle": lambda p: p.write_bytes(_pickle_bytes()),
        "torch.save": lambda p: p.write_bytes(_torch_save_bytes(tmp_path)),
        "empty": lambda p: p.write_bytes(b""),
        "truncated": lambda p: p.write_bytes(raw[: len(raw) // 2]),
        "random bytes": lambda p: p.write_bytes(os.urandom(256)),
        "other architecture": lambda p: writer(p, "llama", [("direction.1", np.ones(d, dtype=np.float32))]),
        "bad tensor name": lambda p: writer(p, tensors=[("direction.x", np.ones(d, dtype=np.float32))]),
        "layer 0": lambda p: writer(p, tensors=[("direction.0", np.ones(d, dtype=np.float32))]),
        "nan": lambda p: writer(p, tensors=[("direction.1", np.full(d, np.nan, dtype=np.float32))]),
        "no directions": lambda p: writer(p, tensors=[("other", np.ones(d, dtype=np.float32))]),
        "wrong width": lambda p: writer(p, tensors=[("direction.1", np.ones(d + 3, dtype=np.float32))]),
        "mixed widths": lambda p: writer(p, tensors=[("direction.1", np.ones(d, dtype=np.float32)), ("direction.2", np.ones(5, dtype=np.float32))]),
    }
    for what, craft in cases.items():
        p = tmp_path / f"{what}.gguf"
        craft(p)
        with pytest.raises(CzaoLensError):
            SteeringVector.from_gguf(p, model=tiny)
