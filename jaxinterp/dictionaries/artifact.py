"""A trained dictionary on disk: self-describing, loadable without its run's config or optimizer.

A dictionary directory holds

    jaxinterp_dictionary.json   {"format", "spec" (the kind and its static shape), "site",
                                 "target_site", "model", "metadata"}
    weights/                    the parameters (normalisation scales included), an Orbax checkpoint

Every training run writes one to `<output.dir>/dictionary/`; `load_dictionary` accepts that
directory or the run directory. The loaded `Dictionary` encodes, decodes and reconstructs NumPy or
JAX arrays of raw activations of any leading shape; steering, reads, monitoring, generation and the
evaluation take it as it is.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.dictionaries import clt, sae
from jaxinterp.errors import JaxinterpError

FORMAT = 1
META = "jaxinterp_dictionary.json"
WEIGHTS = "weights"


class DictionaryError(JaxinterpError):
    """A dictionary that cannot be read, or that does not fit the model or site it is used with."""


@dataclasses.dataclass(frozen=True)
class Dictionary:
    """A dictionary's kind and shape (`spec`), its parameters, and where it reads and writes."""

    spec: sae.DictionarySpec
    params: sae.Params
    site: str | None = None
    """The intercept site it reads (for example `blocks.15.mlp_in`); None when unknown."""
    target_site: str | None = None
    """The site a transcoder reconstructs (None: `site`)."""
    model: str | None = None
    """The model it was trained on (a registry name or a path), when known."""
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    @property
    def d_out(self) -> int:
        return self.spec.d_out

    @property
    def d_sae(self) -> int:
        return self.spec.d_sae

    @property
    def writes(self) -> str | None:
        """The site its output replaces or edits: the target site, else the site it reads."""
        return self.target_site or self.site

    def encode(self, x) -> jax.Array:
        """Dense feature activations [..., d_sae] of raw activations [..., d_in]."""
        return _rowwise(_encode, self, x, self.d_in)

    def encode_sparse(self, x) -> tuple[jax.Array, jax.Array] | None:
        """(values [..., k], feature ids [..., k]) of raw activations [..., d_in], largest first, for
        kinds that select k features a row (TopK and its Matryoshka); None for the others."""
        if not self.spec.kind.row_topk:
            return None
        a = jnp.asarray(x)
        if a.ndim == 0 or a.shape[-1] != self.d_in:
            raise DictionaryError(f"expected an array [..., {self.d_in}], got shape {tuple(a.shape)}")
        vals, ids = _encode_sparse(self.spec, self.params, a.reshape(-1, self.d_in).astype(jnp.float32))
        return vals.reshape(*a.shape[:-1], -1), ids.reshape(*a.shape[:-1], -1)

    def decode(self, f, *, width: int | None = None) -> jax.Array:
        """Raw output [..., d_out] of feature activations [..., d_sae] (without a skip path's share,
        which needs the input: see `reconstruct`); `width`: a Matryoshka prefix's features only."""
        if self.spec.row_norm != "none":
            raise DictionaryError(f"this dictionary normalises each input row ({self.spec.row_norm}); its output "
                                  "depends on the row's statistics: use reconstruct(x)")
        return _rowwise(_decode, self, f, self.d_sae, self._width(width))

    def reconstruct(self, x, *, width: int | None = None) -> jax.Array:
        """The dictionary's output [..., d_out] for raw activations [..., d_in]; `width`: with the
        first `width` features only (a Matryoshka prefix; any width from 1 to d_sae)."""
        return _rowwise(_reconstruct, self, x, self.d_in, self._width(width))

    def _width(self, width: int | None) -> jax.Array | None:
        if width is None:  # the whole dictionary: no prefix mask at all
            return None
        if not 1 <= int(width) <= self.d_sae:
            raise DictionaryError(f"width={width}: choose a prefix width from 1 to d_sae={self.d_sae}"
                                  + (f" (trained prefixes: {list(self.spec.widths)})" if self.spec.matryoshka_widths else ""))
        return jnp.int32(width)

    def check_model(self, d_model: int, n_layers: int, *, site: str | None = None, model: str = "the model") -> None:
        """Raise a one-line `DictionaryError` when the dictionary cannot be used with a model of
        width `d_model` and `n_layers` layers at `site` (default: its own)."""
        from jaxinterp.models.intercept import SiteError, parse_site

        site = site or self.site
        if self.spec.row_norm != "none":
            raise DictionaryError(f"the dictionary normalises each input row ({self.spec.row_norm}, from its SAELens "
                                  "config): it encodes and reconstructs (Dictionary.encode / reconstruct) but cannot "
                                  "be attached to a model's sites; use one trained without run-time normalisation")
        if site is None:
            raise DictionaryError("the dictionary names no site; attach it at an explicit site")
        for s in (site, self.target_site):
            if s is None:
                continue
            try:
                parse_site(s, n_layers)
            except SiteError as e:
                raise DictionaryError(f"the dictionary reads {s!r}, a site {model} ({n_layers} layers) does not "
                                      f"have: {e}") from None
        if self.d_in != d_model or self.d_out != d_model:
            raise DictionaryError(f"the dictionary at {site!r} has d_in={self.d_in}, d_out={self.d_out}, but {model} "
                                  f"has width {d_model}; it was trained on another model")


@dataclasses.dataclass(frozen=True)
class CLTDictionary:
    """A cross-layer transcoder (`dictionaries.clt`): its spec, parameters and the model it covers.
    Its sites are every covered layer's input site and mlp_out (`sites`)."""

    spec: clt.CLTSpec
    params: clt.Params
    model: str | None = None
    metadata: dict = dataclasses.field(default_factory=dict)

    @property
    def sites(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(input sites, mlp_out sites), one per covered layer."""
        return clt.sites(self.spec)

    @property
    def d_sae(self) -> int:
        return self.spec.d_sae

    def _rows(self, x) -> jax.Array:
        a = jnp.asarray(x)
        want = (self.spec.n_layers, self.spec.d_model)
        if a.ndim < 2 or a.shape[-2:] != want:
            raise DictionaryError(f"expected an array [..., {want[0]}, {want[1]}] (every covered layer's input), "
                                  f"got shape {tuple(a.shape)}")
        return a.reshape(-1, *want).astype(jnp.float32)

    def encode(self, x) -> jax.Array:
        """Feature activations [..., L, F] of raw inputs [..., L, D] (each covered layer's input site)."""
        a = jnp.asarray(x)
        return _clt_encode(self.spec, self.params, self._rows(a)).reshape(*a.shape[:-1], self.spec.d_sae)

    def reconstruct(self, x) -> jax.Array:
        """Every covered layer's mlp_out [..., L, D] as the CLT computes it from raw inputs [..., L, D]."""
        a = jnp.asarray(x)
        return _clt_reconstruct(self.spec, self.params, self._rows(a)).reshape(a.shape)

    def check_model(self, d_model: int, n_layers: int, *, model: str = "the model") -> None:
        """Raise a one-line `DictionaryError` when the CLT does not fit a model of that shape."""
        if self.spec.post_encoder:
            raise DictionaryError("this CLT adds per-target offsets to its active features (clt-training's post-"
                                  "encoder): it encodes and reconstructs (CLTDictionary.encode / reconstruct); the "
                                  "replacement model, attribution and steering take CLTs without them")
        last = self.spec.first_layer + self.spec.n_layers - 1
        if self.spec.d_model != d_model or last >= n_layers:
            raise DictionaryError(f"the CLT covers layers {self.spec.first_layer}..{last} of width {self.spec.d_model}; "
                                  f"{model} has {n_layers} layers of width {d_model}: it was trained on another model")


@partial(jax.jit, static_argnums=0)
def _clt_encode(spec, params, x):
    return clt.encode(spec, params, x)


@partial(jax.jit, static_argnums=0)
def _clt_reconstruct(spec, params, x):
    return clt.reconstruct(spec, params, x)


@partial(jax.jit, static_argnums=0)
def _encode(spec, params, x):
    return sae.encode(spec, params, x)


@partial(jax.jit, static_argnums=0)
def _encode_sparse(spec, params, x):
    return sae.encode_sparse(spec, params, x)


@partial(jax.jit, static_argnums=0)
def _decode(spec, params, f, width):
    return sae.decode(spec, params, f, width=width)


@partial(jax.jit, static_argnums=0)
def _reconstruct(spec, params, x, width):
    return sae.reconstruct(spec, params, x, width=width)


def _rowwise(fn, d: Dictionary, a, width: int, *extra) -> jax.Array:
    a = jnp.asarray(a)
    if a.ndim == 0 or a.shape[-1] != width:
        raise DictionaryError(f"expected an array [..., {width}], got shape {tuple(a.shape)}")
    out = fn(d.spec, d.params, a.reshape(-1, width).astype(jnp.float32), *extra)
    return out.reshape(*a.shape[:-1], out.shape[-1])


def _this_process_checkpointer():
    """An Orbax checkpointer of this process alone: in a multi-process run the artifact is written
    (by process 0) and read (by any process) without waiting for the others."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"artifact{me}"))


def save(path: str | Path, dictionary: Dictionary | CLTDictionary, *, overwrite: bool = True) -> Path:
    """Write `dictionary` to the directory `path` (replacing what a previous save left there when
    `overwrite`); returns the directory."""

    out = Path(path).absolute()
    if out.exists():
        if not overwrite:
            raise DictionaryError(f"{out} exists; choose another path or pass overwrite=True")
        if not (out / META).is_file() and any(out.iterdir()):
            raise DictionaryError(f"{out} exists and is not a dictionary directory; choose another path")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {k: np.asarray(jax.device_get(v)) for k, v in dictionary.params.items()}
    with _this_process_checkpointer() as ckptr:
        ckptr.save(tmp / WEIGHTS, params)
        ckptr.wait_until_finished()
    if isinstance(dictionary, CLTDictionary):
        inputs, targets = dictionary.sites
        meta = {"format": FORMAT, "kind": "clt", "spec": dataclasses.asdict(dictionary.spec), "sites": inputs,
                "target_sites": targets, "model": dictionary.model, "metadata": dictionary.metadata}
    else:
        meta = {"format": FORMAT, "spec": dataclasses.asdict(dictionary.spec), "site": dictionary.site,
                "target_site": dictionary.target_site, "model": dictionary.model, "metadata": dictionary.metadata}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(out)  # a dictionary directory appears whole or not at all
    return out


def _directory(path: Path) -> Path:
    if (path / META).is_file():
        return path
    if (path / "dictionary" / META).is_file():  # a run directory
        return path / "dictionary"
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        raise DictionaryError(f"{path} is a run directory without a dictionary/ (the run did not finish); "
                              "finish it with launch/train.py --config CONFIG --resume")
    raise DictionaryError(f"{path} holds no {META}; pass a dictionary directory or a run directory "
                          "written by launch/train.py")


def load_dictionary(path: str | Path) -> Dictionary | CLTDictionary:
    """The dictionary saved at `path`, on the default device, in any format it detects
    (`jaxinterp.interop.formats.FORMATS`): a jaxinterp dictionary directory or run directory; a
    SAELens folder (any SAELens version; every architecture that is one of our kinds); a sparsify
    hookpoint folder (SAE, transcoder, skip transcoder); Gemma Scope 1 / 2 and Llama Scope folders;
    a circuit-tracer directory (`config.yaml` naming `model_kind`: a cross-layer transcoder reads as
    a `CLTDictionary`, a per-layer transcoder set as one of span 1 with skips where the set has
    them); an EleutherAI clt-training run folder as a `CLTDictionary`. Foreign formats encode and
    reconstruct with their own library's numerics."""
    from jaxinterp.interop import formats

    return formats.load(path)


def load_jaxinterp(p: Path) -> Dictionary | CLTDictionary:
    """A jaxinterp dictionary directory, or the run directory holding one."""
    d = _directory(p)
    try:
        meta = json.loads((d / META).read_text())
        fmt = meta["format"]
        is_clt = meta.get("kind") == "clt"
        spec = clt.CLTSpec(**meta["spec"]) if is_clt else sae.DictionarySpec(**meta["spec"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DictionaryError(f"{d / META} is not a readable dictionary description ({e}); save it again") from None
    if fmt != FORMAT:
        raise DictionaryError(f"{d / META} has format {fmt}, this jaxinterp reads {FORMAT}")
    init = (lambda: clt.init(jax.random.key(0), spec)) if is_clt else (lambda: sae.init(jax.random.key(0), spec))
    shapes = jax.eval_shape(init)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device) for k, v in shapes.items()}
    with _this_process_checkpointer() as ckptr:
        params = ckptr.restore(d / WEIGHTS, target)
    if is_clt:
        return CLTDictionary(spec=spec, params=dict(params), model=meta.get("model"), metadata=meta.get("metadata") or {})
    return Dictionary(spec=spec, params=dict(params), site=meta.get("site"), target_site=meta.get("target_site"),
                      model=meta.get("model"), metadata=meta.get("metadata") or {})


def load_site_dictionary(path: str | Path, *, use: str = "this command") -> Dictionary:
    """`load_dictionary` for uses that need one site's dictionary (steering specs, dashboards,
    monitoring): a cross-layer transcoder is refused in one line naming what takes it."""
    d = load_dictionary(path)
    if isinstance(d, CLTDictionary):
        raise DictionaryError(f"{path} is a cross-layer transcoder ({d.spec.n_layers} layers); {use} takes one "
                              "site's dictionary. CLTs: launch/eval.py, jaxinterp.circuits (replacement model) and "
                              "jaxinterp.steering.clt (steer_clt, steering_vectors, top_features)")
    return d


def _load_circuit_tracer(p: Path) -> CLTDictionary:
    from jaxinterp.interop import circuit_tracer as ct

    try:
        import yaml

        kind = (yaml.safe_load((p / "config.yaml").read_text()) or {}).get("model_kind")
    except Exception as e:  # noqa: BLE001 - any unreadable config gets the same one-line answer
        raise DictionaryError(f"{p / 'config.yaml'} is not readable YAML ({e}); expected circuit-tracer's config") from None
    if kind == "cross_layer_transcoder":
        spec, params, meta = ct.load_clt(p)
        return CLTDictionary(spec=spec, params=params, model=meta.get("model_name"), metadata={"format": "circuit-tracer"})
    if kind == "transcoder_set":
        spec, params, meta = ct.load_transcoder_set_as_clt(p)
        return CLTDictionary(spec=spec, params=params, model=meta.get("model_name"),
                             metadata={"format": "circuit-tracer", "model_kind": "transcoder_set"})
    raise DictionaryError(f"{p / 'config.yaml'} has model_kind {kind!r}; circuit-tracer directories hold "
                          "cross_layer_transcoder or transcoder_set, jaxinterp ones a jaxinterp_dictionary.json")
