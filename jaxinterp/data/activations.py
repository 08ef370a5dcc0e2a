"""Live activations from a language model: corpus -> contexts -> forward stopped at the site.

Axes: `N` contexts, `T` context length, `D` d_model.

A transcoder reads two sites (`data.site`, `data.target_site`): one forward captures both and
each row holds their values side by side, [D_in + D_out] (see `dictionaries.split`). A CLT reads
every covered layer's input and mlp_out (`clt_sites`), [2 L D], from one forward stopped after its
last layer.

Contexts are visited in a seeded order (new each epoch), `chunk_contexts` at a time: the forward
runs up to the site only, the BOS position is dropped, and the chunk's rows are shuffled across
contexts (the mixing buffer) before being cut into batches. The state is (chunk, offset), and a
chunk is a pure function of (seed, chunk), so a resumed run recomputes it and reads on exactly
where it stopped. `launch/harvest.py` writes the chunks of the first epoch to disk (`cache.py`).

On a mesh of G data shards (`RowShare`), a chunk's contexts are cut in G equal groups and block g
of every batch is drawn from group g's rows (shuffled within the group, one forward per group): a
process computes its own groups' contexts only, and the global batches are the same numbers
whatever the number of processes. G = 1 is the single-group order above. A process's groups are
spread over its local accelerators (`forward_devices`), each holding a copy of the model, and run
at once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from jaxinterp.data.batches import RowShare
from jaxinterp.data.npy import DataError
from jaxinterp.config import DataConfig
from jaxinterp.data.corpus import corpus_documents, held_out_contexts, split_documents, token_contexts
from jaxinterp.models import Plan, forward, load_model, parse_site


Sites = str | tuple[str, ...]
"""One site, or several whose values a row holds side by side (a transcoder's input and target)."""


def site_tuple(cfg: DataConfig) -> tuple[str, ...]:
    """The sites a source reads for `cfg`: `data.site`, then `data.target_site` when set."""
    assert cfg.site is not None
    return (cfg.site,) if cfg.target_site is None else (cfg.site, cfg.target_site)


def clt_sites(clt_cfg, n_model_layers: int) -> tuple[str, ...]:
    """A CLT's sites (`dictionary.clt`): each covered layer's input site, then each one's mlp_out;
    the covered layers run from `first_layer` for `n_layers` (unset: to the model's last layer).
    A row holds them side by side: 2 L D values, which is what a row costs (float32: 8 L D bytes;
    SmolLM2-135M over all 30 layers: 138 KB a row)."""
    n = clt_cfg.n_layers if clt_cfg.n_layers is not None else n_model_layers - clt_cfg.first_layer
    if n < 1 or clt_cfg.first_layer + n > n_model_layers:
        raise DataError(f"dictionary.clt covers layers {clt_cfg.first_layer}..{clt_cfg.first_layer + n - 1}, the "
                        f"model has {n_model_layers} (0..{n_model_layers - 1}); lower dictionary.clt.first_layer or "
                        "n_layers")
    layers = range(clt_cfg.first_layer, clt_cfg.first_layer + n)
    return (*(f"blocks.{l}.{clt_cfg.input_point}" for l in layers), *(f"blocks.{l}.mlp_out" for l in layers))


def source_sites(cfg, n_model_layers: int) -> tuple[str, ...]:
    """The sites a training run of `cfg` (a whole `Config`) reads."""
    from jaxinterp.dictionaries import clt

    if clt.configured(cfg.dictionary):
        return clt_sites(cfg.dictionary.clt, n_model_layers)
    return site_tuple(cfg.data)


def open_site_model(name: str, site: Sites, *, model=None, tokenizer=None):
    """(model, tokenizer) for reading activations at `site`: loaded by name unless given, checked."""
    if model is None:
        model, tokenizer = load_model(name)
    if tokenizer is None:
        raise DataError(f"data.model {name!r} has no tokenizer; use a GGUF file or a registry name")
    for s in (site,) if isinstance(site, str) else site:
        parse_site(s, model.cfg.n_layers)
    return model, tokenizer


def _dispatch(model, contexts_nt: np.ndarray, sites: tuple[str, ...]) -> list:
    """The forward's captured values at `sites`, dispatched (not waited for) on the model's device."""
    res = forward(model, jnp.asarray(contexts_nt), plan=Plan(capture=sites, stop_early=True))
    return [res.captured[s] for s in sites]


def _rows(captured: list) -> np.ndarray:
    acts = np.concatenate([np.asarray(c, np.float32)[:, 1:] for c in captured], axis=-1)
    return acts.reshape(-1, acts.shape[-1])


def site_activations(model, contexts_nt: np.ndarray, site: Sites) -> np.ndarray:
    """Activations [N * (T - 1), D] at `site` for every non-BOS position (several sites: their
    values side by side, [N * (T - 1), D1 + D2 + ...], from one forward)."""
    sites = (site,) if isinstance(site, str) else tuple(site)
    return _rows(_dispatch(model, contexts_nt, sites))


def site_activations_many(models: list, blocks: list[np.ndarray], site: Sites) -> list[np.ndarray]:
    """`site_activations` of each block of contexts, block j on `models[j % len(models)]` (copies of
    one model on several devices, `model_copies`): every forward is dispatched before any is
    waited for, so the devices run at once."""
    sites = (site,) if isinstance(site, str) else tuple(site)
    pending = [_dispatch(models[j % len(models)], b, sites) for j, b in enumerate(blocks)]
    return [_rows(c) for c in pending]


def forward_devices(devices: list | None = None) -> list:
    """The local devices this process runs the language model's forwards on: `devices` when given,
    else every local accelerator; on CPU one (its devices share the same cores, and each copy of the
    model would cost host memory)."""
    if devices is not None:
        return list(devices)
    import jax

    local = jax.local_devices()
    return local if local[0].platform != "cpu" else local[:1]


def model_copies(model, devices: list) -> list:
    """`model` on each of `devices` (the model itself where it already lives)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    home = {d for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array) for d in leaf.devices()}
    return [model if home == {d} else nnx.merge(graphdef, jax.device_put(state, d)) for d in devices]


def visit_order(n_contexts: int, seed: int, epoch: int) -> np.ndarray:
    """The order [N] in which `epoch` visits the contexts; chunk i holds entries [i*C, (i+1)*C)."""
    return np.random.default_rng([seed, epoch]).permutation(n_contexts)


def chunk_order(seed: int, epoch: int, chunk: int, n_rows: int) -> np.ndarray:
    """The order [R] in which a chunk's rows are shuffled across its contexts."""
    return np.random.default_rng([seed, epoch, chunk, 1]).permutation(n_rows)


def chunk_rows(model, contexts_nt: np.ndarray, site: Sites, seed: int, epoch: int, chunk: int) -> np.ndarray:
    """The rows [N * (T - 1), D] of one chunk of contexts, shuffled across its contexts."""
    rows = site_activations(model, contexts_nt, site)
    return rows[chunk_order(seed, epoch, chunk, len(rows))]


def eval_activation_batches(model, contexts_nt: np.ndarray, site: Sites, chunk_contexts: int, n_tokens: int,
                            batch_size: int) -> Iterator[np.ndarray]:
    """Batches [<= batch_size, D] of the site's activations over the first contexts covering `n_tokens`."""
    per = contexts_nt.shape[1] - 1
    n_ctx = max(1, min(len(contexts_nt), -(-n_tokens // per)))
    for s in range(0, n_ctx, chunk_contexts):
        rows = site_activations(model, contexts_nt[s : min(s + chunk_contexts, n_ctx)], site)
        for r in range(0, len(rows), batch_size):
            yield rows[r : r + batch_size]


class ModelSource:
    """Batches of a model's activations at `cfg.site` over `cfg.corpus`, resumable."""

    host_side = False
    """Batches come from an XLA program (the LM forward)."""

    def __init__(self, cfg: DataConfig, batch_size: int, seed: int, *, model=None, tokenizer=None,
                 sites: tuple[str, ...] | None = None, devices: list | None = None):
        if cfg.site is None and sites is None:
            raise DataError("data.site: required for data.source 'model', for example blocks.15.resid_post")
        self.sites = tuple(sites) if sites is not None else site_tuple(cfg)
        model, tokenizer = open_site_model(cfg.model, self.sites, model=model, tokenizer=tokenizer)
        self.model, self.tokenizer, self.site, self.target_site = model, tokenizer, cfg.site, cfg.target_site
        self.batch_size, self.seed, self.chunk_contexts = batch_size, seed, cfg.chunk_contexts
        train_docs, eval_docs = split_documents(corpus_documents(cfg.corpus), cfg.eval_fraction)
        self.train_contexts = token_contexts(train_docs, tokenizer, cfg.context_length)
        self.eval_contexts = held_out_contexts(train_docs, eval_docs, tokenizer, cfg.context_length)
        self.d_in = model.cfg.d_model
        self.d_out = model.cfg.d_model if cfg.target_site is not None else None
        self.true_directions = None
        n = len(self.train_contexts)
        self._chunks_per_epoch = max(1, n // self.chunk_contexts)
        self.share = RowShare()
        self._devices = devices
        self._chunk, self._offset, self._rows = 0, 0, None

    def set_share(self, share: RowShare) -> None:
        """Compute only `share` of each batch: the forward of this process's groups of each chunk's
        contexts (call before the first batch is read)."""
        if share.groups > 1 and self.chunk_contexts % share.groups:
            raise DataError(f"data.chunk_contexts={self.chunk_contexts} does not divide among the mesh's "
                            f"{share.groups} data shards; set data.chunk_contexts to a multiple of {share.groups}")
        if share.groups > 1 and self.batch_size % share.groups:
            raise DataError(f"train.batch_size={self.batch_size} does not divide among the mesh's {share.groups} "
                            "data shards; pick a multiple of the data-parallel size")
        self.share, self._rows = share, None

    def _chunk_rows(self, chunk: int) -> list[np.ndarray]:
        """This process's groups of one chunk: rows [R / G, D] each, in group order."""
        epoch, i = divmod(chunk, self._chunks_per_epoch)
        order = visit_order(len(self.train_contexts), self.seed, epoch)
        picked = np.sort(order[i * self.chunk_contexts : (i + 1) * self.chunk_contexts])
        g = self.share
        if g.groups == 1:
            return [chunk_rows(self.model, self.train_contexts[picked], self.sites, self.seed, epoch, i)]
        per = self.chunk_contexts // g.groups
        # one forward per group (the same numbers on any process), the groups spread over the local devices
        blocks = [self.train_contexts[picked[k * per : (k + 1) * per]] for k in range(g.first, g.last)]
        groups = site_activations_many(self._copies, blocks, self.sites)
        return [rows[np.random.default_rng([self.seed, epoch, i, 1, k]).permutation(len(rows))]
                for k, rows in zip(range(g.first, g.last), groups)]

    @functools.cached_property
    def _copies(self) -> list:
        return model_copies(self.model, forward_devices(self._devices))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        groups = self.share.groups
        per = self.batch_size // groups
        if self._rows is None:
            self._rows = self._chunk_rows(self._chunk)
        if (self._offset + self.batch_size) // groups > len(self._rows[0]):
            self._chunk, self._offset = self._chunk + 1, 0
            self._rows = self._chunk_rows(self._chunk)
            if len(self._rows[0]) < per:
                raise DataError(
                    f"data.chunk_contexts={self.chunk_contexts} contexts give {len(self._rows[0]) * groups} rows, "
                    f"fewer than train.batch_size={self.batch_size}; raise data.chunk_contexts"
                )
        at = self._offset // groups
        batch = self._rows[0][at : at + per] if len(self._rows) == 1 else np.concatenate(
            [r[at : at + per] for r in self._rows])
        self._offset += self.batch_size
        return batch

    def get_state(self) -> dict:
        return {"chunk": self._chunk, "offset": self._offset}

    def set_state(self, state: dict) -> None:
        self._chunk, self._offset = int(state["chunk"]), int(state["offset"])
        self._rows = None

    def eval_batches(self, n_tokens: int, batch_size: int):
        return eval_activation_batches(self.model, self.eval_contexts, self.sites, self.chunk_contexts, n_tokens,
                                       batch_size)
