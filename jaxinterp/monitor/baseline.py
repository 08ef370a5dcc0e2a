"""Baselines: a dictionary's feature statistics at its site over a corpus, saved with Orbax.

Axes: `N` contexts, `T` context length, `F` d_sae.

`corpus_stats` runs the model to the site (stopping there) over fixed-length BOS-led contexts,
encodes every position but the BOS with the dictionary, and folds the activations into a `Stats`.
A baseline directory holds the Stats (Orbax `StandardSave`) and `baseline.json` (site, model,
corpus, d_sae, tokens), so `load_baseline` restores it without knowing its shape in advance.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.errors import MissingFileError
from jaxinterp.errors import UsageError
from jaxinterp.dictionaries import sae as dl
from jaxinterp.models.decoder import forward
from jaxinterp.models.intercept import Plan, parse_site
from jaxinterp.monitor import stats as st


def corpus_stats(model, spec: dl.DictionarySpec, params: dl.Params, site: str, contexts_nt: np.ndarray, *,
                 batch: int = 16, state: st.Stats | None = None) -> st.Stats:
    """Feature statistics at `site` over the contexts (their first position, BOS, left out)."""
    parse_site(site, model.cfg.n_layers)
    if spec.d_in != model.cfg.d_model:
        raise UsageError(f"the dictionary has d_in={spec.d_in}, the model's width is {model.cfg.d_model}; "
                         "use the dictionary trained for this model")
    state = state if state is not None else st.empty(spec.d_sae)
    fold = jax.jit(lambda s, x: st.update(s, dl.encode(spec, params, x.reshape(-1, x.shape[-1]))))
    for s in range(0, len(contexts_nt), batch):
        res = forward(model, jnp.asarray(contexts_nt[s : s + batch]), plan=Plan(capture=(site,), stop_early=True))
        state = fold(state, res.captured[site][:, 1:])
    return state


def save_baseline(directory: str | Path, stats: st.Stats, meta: dict) -> Path:
    import orbax.checkpoint as ocp

    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    tree = {k: np.asarray(v) for k, v in stats._asdict().items() if v is not None}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(d / "stats", tree, force=True)
    info = {**meta, "d_sae": int(stats.count.shape[0]), "tokens": float(stats.tokens),
            "buckets": 0 if stats.hist is None else int(stats.hist.shape[1])}
    (d / "baseline.json").write_text(json.dumps(info, indent=1))
    return d


def load_baseline(directory: str | Path) -> tuple[st.Stats, dict]:
    import orbax.checkpoint as ocp

    d = Path(directory).resolve()
    meta_path = d / "baseline.json"
    if not meta_path.is_file():
        raise MissingFileError(f"{meta_path} not found; write a baseline with python launch/monitor.py baseline")
    meta = json.loads(meta_path.read_text())
    f, h = meta["d_sae"], meta.get("buckets", 0)
    target = {"count": np.zeros(f, np.float32), "mean": np.zeros(f, np.float32), "m2": np.zeros(f, np.float32),
              "tokens": np.zeros((), np.float32)}
    if h:
        target["hist"] = np.zeros((f, h), np.float32)
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(d / "stats", target)
    return st.Stats(**{k: jnp.asarray(v) for k, v in tree.items()}), meta
