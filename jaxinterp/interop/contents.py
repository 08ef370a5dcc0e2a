"""What a run directory, one of its checkpoints or a dictionary artifact holds, read from Orbax's
metadata and the JSON/YAML files beside it: no arrays are loaded and no training code runs.

`describe(path)` returns a dict: `kind` (run, checkpoint, artifact), and as they apply `steps`
(the checkpoints kept), `step`, `arrays` (name -> shape, dtype, saved sharding: mesh shape, axis
names, partition spec), `data` (each process's data position), `config` (the run's config.yaml),
`dictionary` (the artifact's or run's description). `format_human` prints it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from jaxinterp.errors import JaxinterpError

META = "jaxinterp_dictionary.json"
"""The artifact's description file (`jaxinterp.dictionaries.artifact.META`)."""


class InspectError(JaxinterpError):
    """The path holds nothing this reads; the message says what was found and what was expected."""


@contextlib.contextmanager
def _quiet():
    """Orbax logs a warning for each metadata file an item directory lacks by design."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def arrays(item: Path) -> dict[str, dict]:
    """name -> {shape, dtype, sharding} of an Orbax pytree item directory (a checkpoint's `state`, an
    artifact's `weights`), from its metadata alone."""
    import jax
    import orbax.checkpoint as ocp

    try:
        with _quiet(), ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(item)
    except Exception as e:  # orbax raises several types for a missing or foreign directory
        raise InspectError(f"{item} is not a readable Orbax checkpoint item ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    tree = getattr(meta, "item_metadata", meta)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        sh = getattr(leaf, "sharding", None)
        saved = None
        if sh is not None and hasattr(sh, "partition_spec"):
            saved = {"mesh": [int(n) for n in getattr(sh, "shape", [])], "axes": list(getattr(sh, "axis_names", [])),
                     "spec": [None if p is None else (list(p) if isinstance(p, (list, tuple)) else p)
                              for p in sh.partition_spec]}
        elif sh is not None:
            saved = {"kind": type(sh).__name__}
        out[name] = {"shape": list(getattr(leaf, "shape", ())), "dtype": str(getattr(leaf, "dtype", "?")),
                     "sharding": saved}
    return out


def _data(step_dir: Path) -> dict | None:
    f = step_dir / "data" / "metadata"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def _yaml(path: Path) -> dict | None:
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


def _checkpoint(step_dir: Path) -> dict:
    return {"kind": "checkpoint", "step": int(step_dir.name) if step_dir.name.isdigit() else None,
            "arrays": arrays(step_dir / "state"), "data": _data(step_dir)}


def describe(path: str | Path) -> dict:
    """What `path` holds: a run directory, a checkpoint step directory or a dictionary artifact."""
    p = Path(path)
    if not p.exists():
        raise InspectError(f"{p} not found; pass a run directory, a checkpoint (RUN/checkpoints/STEP) or a "
                           "dictionary artifact")
    if (p / META).is_file():
        return {"kind": "artifact", "dictionary": json.loads((p / META).read_text()), "arrays": arrays(p / "weights")}
    if (p / "state").is_dir():
        return _checkpoint(p)
    if (p / "checkpoints").is_dir() or (p / "config.yaml").is_file():
        out: dict = {"kind": "run", "config": _yaml(p / "config.yaml")}
        if (p / "dictionary.json").is_file():
            out["dictionary"] = json.loads((p / "dictionary.json").read_text())
        steps = _steps(p / "checkpoints") if (p / "checkpoints").is_dir() else []
        out["steps"] = steps
        if steps:
            last = _checkpoint(p / "checkpoints" / str(steps[-1]))
            out |= {"step": last["step"], "arrays": last["arrays"], "data": last["data"]}
        out["artifact"] = (p / "dictionary" / META).is_file()
        return out
    found = sorted(q.name for q in p.iterdir())[:8] if p.is_dir() else [p.name]
    raise InspectError(f"{p} holds {found}; expected a run directory (config.yaml, checkpoints/), a checkpoint "
                       f"(state/, data/) or a dictionary artifact ({META}, weights/)")


def _spec(s: dict | None) -> str:
    if s is None:
        return "-"
    if "spec" not in s:
        return s.get("kind", "-")
    mesh = "x".join(f"{a}={n}" for a, n in zip(s["axes"], s["mesh"]))
    return f"P({', '.join('None' if x is None else str(x) for x in s['spec'])}) on {mesh}"


def format_human(d: dict) -> str:
    lines = [f"{d['kind']}"]
    if d.get("steps") is not None:
        lines.append(f"checkpoints at steps {d['steps'] or 'none'}; artifact written: {d.get('artifact')}")
    if d.get("step") is not None:
        lines.append(f"step {d['step']}")
    if d.get("dictionary"):
        lines.append("dictionary: " + json.dumps(d["dictionary"].get("spec", d["dictionary"]), sort_keys=True))
    if d.get("config"):
        c = d["config"]
        lines.append(f"config: data.source {c.get('data', {}).get('source')}, train.batch_size "
                     f"{c.get('train', {}).get('batch_size')}, mesh {c.get('mesh')}")
    if d.get("data") is not None:
        lines.append(f"data positions: {json.dumps(d['data'])}")
    for name, a in (d.get("arrays") or {}).items():
        lines.append(f"  {name:40} {a['dtype']:9} {str(tuple(a['shape'])):16} {_spec(a['sharding'])}")
    return "\n".join(lines)
