"""Steering vectors in and out: llama.cpp's control-vector GGUF (as repeng writes it), and plain
`{site: vector}` files (`.npz` / `.safetensors`).

The GGUF layout: architecture `controlvector`, metadata `controlvector.model_hint` (a model type)
and `controlvector.layer_count`, one float32 tensor `direction.{k}` [d_model] per layer, which
llama.cpp adds to the output of block k (0-based; it has no vector for block 0, and refuses index
0). Here that is the site `blocks.{k}.resid_post`, steered with mode `add` at scale 1 (llama.cpp's
`--control-vector-scaled FILE S` is scale S).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxinterp.steering.spec import SteeringError, SteeringVector

ARCH = "controlvector"
_SITE = re.compile(r"blocks\.(\d+)\.resid_post")


def _layer(site: str) -> int:
    m = _SITE.fullmatch(site)
    if m is None:
        raise SteeringError(f"control vectors steer block outputs: site {site!r} is not blocks.K.resid_post; "
                            "llama.cpp adds direction.K to the output of block K")
    k = int(m.group(1))
    if k == 0:
        raise SteeringError("llama.cpp has no control vector for block 0 (direction.0 is refused): steer "
                            "blocks.1.resid_post or later")
    return k


def write_gguf(path: str | Path, vectors: dict[str, np.ndarray], *, model_hint: str = "llama") -> Path:
    """Write `{blocks.K.resid_post: vector [D]}` as a control-vector GGUF that llama.cpp loads."""
    import gguf

    if not vectors:
        raise SteeringError("no vectors to write")
    layers = {_layer(site): np.asarray(v, np.float32).reshape(-1) for site, v in vectors.items()}
    widths = {v.size for v in layers.values()}
    if len(widths) != 1:
        raise SteeringError(f"control vectors of one file share one width; got widths {sorted(widths)}")
    path = Path(path)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_string(f"{ARCH}.model_hint", model_hint)
    w.add_uint32(f"{ARCH}.layer_count", len(layers))
    for k in sorted(layers):
        w.add_tensor(f"direction.{k}", layers[k])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_gguf(path: str | Path) -> dict[str, np.ndarray]:
    """`{blocks.K.resid_post: vector}` of a control-vector GGUF (repeng's `export_gguf`, llama.cpp's)."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise SteeringError(f"control vector {str(p)!r} not found")
    try:
        reader = gguf.GGUFReader(str(p), "r")
    except Exception as e:  # the reader fails in many ways on foreign or truncated files
        raise SteeringError(f"{p} is not a readable GGUF file ({type(e).__name__}); expected a control vector "
                            "written by repeng or llama.cpp") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if arch != ARCH:
        raise SteeringError(f"{p} is a GGUF of architecture {arch!r}, not a control vector ({ARCH!r})")
    out = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None or int(m.group(1)) == 0:
            raise SteeringError(f"{p}: tensor {t.name!r} is not direction.K with K >= 1 (llama.cpp's layout)")
        out[f"blocks.{int(m.group(1))}.resid_post"] = np.asarray(t.data, np.float32).reshape(-1).copy()
    if not out:
        raise SteeringError(f"{p} holds no direction.K tensors")
    return out


def write_vectors(path: str | Path, vectors: dict[str, np.ndarray]) -> Path:
    """`{site: vector}` as `.safetensors` or `.npz` (by the suffix), or a control-vector `.gguf`."""
    p = Path(path)
    arrays = {site: np.asarray(v, np.float32).reshape(-1) for site, v in vectors.items()}
    if p.suffix == ".gguf":
        return write_gguf(p, arrays)
    if p.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(p))
        return p
    if p.suffix == ".npz":
        np.savez(p, **arrays)
        return p
    raise SteeringError(f"{p}: write steering vectors as .gguf (llama.cpp control vector), .safetensors or .npz")


def read_vectors(path: str | Path) -> dict[str, np.ndarray]:
    """`{site: vector}` from a control-vector `.gguf`, a `.safetensors` or an `.npz` of named vectors."""
    p = Path(path)
    if p.suffix == ".gguf":
        return read_gguf(p)
    if not p.is_file():
        raise SteeringError(f"steering vectors {str(p)!r} not found")
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(str(p))
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        raise SteeringError(f"{p}: read steering vectors from .gguf, .safetensors or .npz")
    return {site: np.asarray(v, np.float32).reshape(-1) for site, v in arrays.items()}


def steering(vectors: dict[str, np.ndarray], *, scale: float = 1.0) -> list[SteeringVector]:
    """The `SteeringVector`s that add each vector at its site, `scale` times (llama.cpp's strength)."""
    return [SteeringVector(site=site, vector=v, mode="add", scale=scale) for site, v in sorted(vectors.items())]
