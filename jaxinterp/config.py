"""Typed, frozen run configuration: one dataclass per concern, loaded from YAML.

Every field has a docstring (the string literal under it) and is checked in `__post_init__`; unknown
keys and bad values raise `ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxinterp.errors import JaxinterpError

Activation = Literal["relu", "topk", "batchtopk", "jumprelu", "gated"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
Architecture = Literal["sae", "transcoder", "skip_transcoder", "clt"]
ARCHITECTURES: tuple[str, ...] = typing.get_args(Architecture)


class ConfigError(JaxinterpError):
    """A bad configuration: the message names the key, the value, and what is allowed."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _choice(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Toy superposition: `n_features` unit-norm directions in `d_in` dimensions."""

    n_features: int = 512
    """Number of true feature directions."""
    d_in: int = 64
    """Dimension of the activations."""
    p_active: float = 0.01
    """Probability that each feature is active on a sample."""
    magnitude: Literal["uniform", "exponential", "constant"] = "uniform"
    """Distribution of an active feature's magnitude: uniform on [0, 2*mean], exponential, or constant."""
    magnitude_mean: float = 1.0
    """Mean magnitude of an active feature."""
    group_size: int = 1
    """Features are split into consecutive groups of this size (1: no groups)."""
    group_correlation: float = 0.0
    """Probability that a feature copies its group's shared on/off draw instead of its own."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every sample."""
    seed: int = 0
    """Seed of the true directions (the sample stream uses `train.seed`)."""

    def __post_init__(self) -> None:
        _check(self.n_features > 0, "data.synthetic.n_features", f"must be > 0, got {self.n_features}")
        _check(self.d_in > 0, "data.synthetic.d_in", f"must be > 0, got {self.d_in}")
        _check(0 < self.p_active <= 1, "data.synthetic.p_active", f"must be in (0, 1], got {self.p_active}")
        _choice(self.magnitude, "data.synthetic.magnitude", ("uniform", "exponential", "constant"))
        _check(self.magnitude_mean > 0, "data.synthetic.magnitude_mean", "must be > 0")
        _check(self.group_size >= 1, "data.synthetic.group_size", "must be >= 1")
        _check(0 <= self.group_correlation <= 1, "data.synthetic.group_correlation", "must be in [0, 1]")
        _check(self.noise_std >= 0, "data.synthetic.noise_std", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training activations come from."""

    source: Literal["npy", "synthetic", "model", "cache"] = "synthetic"
    """`npy`: an activation matrix [tokens, d_in] on disk (`path`); `synthetic`: toy superposition;
    `model`: live activations of `model` at `site` over `corpus`; `cache`: activations written to the
    directory `path` by `launch/harvest.py`."""
    path: str | None = None
    """The `.npy` file of activations (source `npy`), or the cache directory (source `cache`)."""
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    """Dtype stored in the `.npy` file; `auto` reads the header (bfloat16 files need `bfloat16`)."""
    target_path: str | None = None
    """Source `npy`, transcoders: the `.npy` file of targets [tokens, d_out], row for row with `path`."""
    true_directions: str | None = None
    """Optional `.npy` [n_features, d_in] of ground-truth directions, to report mmcs for `npy` data."""
    shuffle: bool = True
    """Shuffle rows of an `npy` or `cache` source (seeded by `train.seed`; reshuffled each epoch)."""
    eval_fraction: float = 0.02
    """Fraction of an `npy` file's rows (the last rows), or of a corpus's documents (source `model` and
    `launch/harvest.py`: the last documents), held out for the final evaluation."""
    site: str | None = None
    """Intercept site the activations are read at (for example `blocks.15.resid_post`); source `cache`
    checks it, when set, against the cache's site."""
    target_site: str | None = None
    """Transcoders: the site they reconstruct (for example `blocks.15.mlp_out` from `blocks.15.mlp_in`);
    source `model` reads both sites in one forward, source `cache` checks it against the cache's."""
    model: str = "smollm2-135m"
    """Source `model` and `launch/harvest.py`: a registry name, a .gguf file or an HF checkpoint directory."""
    corpus: str = "shakespeare"
    """Source `model` and `launch/harvest.py`: `shakespeare`, `python-docs`, a folder of .txt files, or a .jsonl file
    with a `text` field."""
    context_length: int = 128
    """Source `model` and `launch/harvest.py`: tokens per context, BOS included."""
    chunk_contexts: int = 64
    """Source `model` and `launch/harvest.py`: contexts per forward pass (and per cache chunk); their
    rows are shuffled together."""
    outlier_norm: float = 0.0
    """Leave out of training, of the final evaluation's metrics and of the loss-recovered splice the
    rows whose norm (input or target) exceeds this multiple of their batch's median row norm: the
    massive activations some models put on a few tokens (SmolLM2's block 15: norms of ~14,000 beside
    a median of ~170, one token in ~4,000), which otherwise set the input scale and dominate every
    mean squared error. In training such a row is replaced by another row of its batch; 0 keeps all."""
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    """Parameters of the synthetic source."""

    def __post_init__(self) -> None:
        _choice(self.source, "data.source", ("npy", "synthetic", "model", "cache"))
        _check(self.context_length >= 2, "data.context_length", f"must be >= 2, got {self.context_length}")
        _check(self.chunk_contexts >= 1, "data.chunk_contexts", f"must be >= 1, got {self.chunk_contexts}")
        _choice(self.dtype, "data.dtype", ("auto", "float16", "bfloat16", "float32"))
        if self.source == "npy":
            _check(self.path is not None, "data.path", "required when data.source is 'npy'")
        if self.target_path is not None:
            _check(self.source == "npy", "data.target_path", f"only for data.source 'npy', got {self.source!r}")
        if self.target_site is not None:
            _check(self.source in ("model", "cache"), "data.target_site",
                   f"read from data.source 'model' or 'cache', got {self.source!r} (npy: set data.target_path)")
            _check(self.target_site != self.site, "data.target_site", f"equals data.site ({self.site!r}); "
                   "drop it for an SAE")
        if self.source == "cache":
            _check(self.path is not None, "data.path", "required when data.source is 'cache' (a directory "
                   "written by launch/harvest.py)")
        _check(0 <= self.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        _check(self.outlier_norm == 0 or self.outlier_norm > 1, "data.outlier_norm",
               f"must be 0 (keep every row) or a multiple of the median norm above 1, got {self.outlier_norm}")


@dataclasses.dataclass(frozen=True)
class CLTConfig:
    """A cross-layer transcoder (`dictionary.architecture: clt`): which layers it covers and how
    far each layer's features write. `dictionary.d_sae` is the number of features per layer."""

    first_layer: int = 0
    """The first covered layer of the model."""
    n_layers: int | None = None
    """Covered layers, from `first_layer`; unset: every layer to the model's last."""
    span: int | None = None
    """Target layers per source layer (layers l .. l + span - 1); unset: every later covered layer."""
    skip: bool = False
    """A linear skip path W_skip per layer, from its input to its MLP output."""
    input_point: Literal["resid_mid", "mlp_in"] = "resid_mid"
    """Where each layer's features read: the residual stream before the MLP, or the MLP's normalised input."""
    tanh_scale: float = 4.0
    """jumprelu: c in the sparsity penalty lambda * tanh(c * ||W_dec,i|| * a_i), lambda being
    `dictionary.l0_coefficient` (warmed up over `train.sparsity_warmup_steps`)."""
    pre_act_coefficient: float = 3e-6
    """jumprelu: lambda_P of the pre-activation loss relu(theta - h) * ||W_dec,i||."""

    def __post_init__(self) -> None:
        _check(self.first_layer >= 0, "dictionary.clt.first_layer", f"must be >= 0, got {self.first_layer}")
        _check(self.n_layers is None or self.n_layers >= 1, "dictionary.clt.n_layers", "must be >= 1")
        _check(self.span is None or self.span >= 1, "dictionary.clt.span", "must be >= 1 (1: one transcoder per layer)")
        _choice(self.input_point, "dictionary.clt.input_point", ("resid_mid", "mlp_in"))
        _check(self.tanh_scale > 0, "dictionary.clt.tanh_scale", "must be > 0")
        _check(self.pre_act_coefficient >= 0, "dictionary.clt.pre_act_coefficient", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class DictionaryConfig:
    """The sparse dictionary's architecture and its sparsity objective."""

    architecture: Architecture = "sae"
    """What the dictionary reconstructs: `sae` (its input), `transcoder` (another site, `data.target_site`
    or `data.target_path`), `skip_transcoder` (a transcoder with a linear skip path), `clt` (a
    cross-layer transcoder over several layers' MLPs, shaped by `dictionary.clt`)."""
    activation: Activation = "topk"
    """One of relu (with L1), topk, batchtopk, jumprelu, gated."""
    d_in: int | None = None
    """Input width; taken from the data when unset."""
    d_sae: int | None = None
    """Number of features; `d_in * expansion` when unset."""
    expansion: int = 8
    """Features per input dimension, used when `d_sae` is unset."""
    k: int = 32
    """Active features per token (topk, batchtopk)."""
    matryoshka_widths: tuple[int, ...] = ()
    """Matryoshka: nested prefix widths, strictly increasing, the last equal to d_sae (e.g. [256, 1024,
    4608]); the loss averages every prefix's reconstruction error. Empty: a plain dictionary."""
    l1_coefficient: float = 5.0
    """Weight of the L1 penalty (relu, gated), applied to activations times decoder row norms."""
    l0_coefficient: float = 1e-3
    """Weight of the L0 penalty (jumprelu)."""
    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of the threshold's pseudo-derivative (jumprelu)."""
    jumprelu_init_threshold: float = 0.05
    """Initial threshold (jumprelu), in units of normalised pre-activations."""
    threshold_ema_decay: float = 0.9
    """EMA decay of the inference threshold that batchtopk's batch thresholds feed. The batch
    threshold of k x B activations varies little from batch to batch but drifts as the dictionary
    adapts after the warm-up (on the toy task from 1.54 to 1.05 in 100 steps): at 0.99 the
    inference threshold still lagged at the end (inference l0 3.15 at k 4), at 0.9 it follows (3.99)."""
    batchtopk_row_warmup: float = 0.9
    """Fraction of `train.steps` during which batchtopk keeps the top k of each row (as TopK) before
    selecting the top k x B of the batch: its latents learn their directions first (0 disables;
    see the README's note on BatchTopK)."""
    aux_k: int | None = None
    """Dead features used by the aux-k loss (topk, batchtopk); `d_in // 2` when unset (CLTs: 2 k per layer)."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the aux-k loss."""
    dead_tokens: int = 1_000_000
    """A feature that has not fired for this many tokens is dead."""
    normalize_activations: bool = True
    """Scale inputs so that E||x||^2 = d_in (stored with the dictionary, folded in on export)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How `b_dec` is initialised from the first batch."""
    unit_norm_decoder: bool = True
    """Keep decoder rows at unit norm (project gradients, renormalise after each step)."""
    clt: CLTConfig = dataclasses.field(default_factory=CLTConfig)
    """Architecture `clt`: the layers covered and the span."""
    topk_path: Literal["auto", "pallas", "sparse", "dense"] = "auto"
    """How topk decodes: `auto` (the Pallas kernel where the backend and sizes allow it, else the
    plain-JAX sparse path), `pallas` (force the kernel; interpret mode on CPU), `sparse` (the
    plain-JAX sparse path), `dense` (values scattered into [B, d_sae] and a matmul, differentiated by
    autodiff: the baseline the sparse backward is checked against)."""

    def __post_init__(self) -> None:
        _choice(self.architecture, "dictionary.architecture", ARCHITECTURES)
        _choice(self.activation, "dictionary.activation", ACTIVATIONS)
        _choice(self.topk_path, "dictionary.topk_path", ("auto", "pallas", "sparse", "dense"))
        _check(self.d_in is None or self.d_in > 0, "dictionary.d_in", "must be > 0")
        _check(self.d_sae is None or self.d_sae > 0, "dictionary.d_sae", f"must be > 0, got {self.d_sae}")
        _check(self.expansion > 0, "dictionary.expansion", "must be > 0")
        _check(self.k > 0, "dictionary.k", f"must be > 0, got {self.k}")
        w = self.matryoshka_widths
        _check(all(a < b for a, b in zip(w, w[1:])) and (not w or w[0] >= 1), "dictionary.matryoshka_widths",
               f"{list(w)} must increase strictly from >= 1")
        if w and self.d_sae is not None:
            _check(w[-1] == self.d_sae, "dictionary.matryoshka_widths", f"the last width ({w[-1]}) must equal "
                   f"d_sae ({self.d_sae})")
        if self.d_sae is not None:
            _check(self.k <= self.d_sae, "dictionary.k", f"k={self.k} exceeds d_sae={self.d_sae}; lower k or raise d_sae")
        _check(self.l1_coefficient >= 0, "dictionary.l1_coefficient", "must be >= 0")
        _check(self.l0_coefficient >= 0, "dictionary.l0_coefficient", "must be >= 0")
        _check(self.jumprelu_bandwidth > 0, "dictionary.jumprelu_bandwidth", "must be > 0")
        _check(0 < self.threshold_ema_decay < 1, "dictionary.threshold_ema_decay", "must be in (0, 1)")
        _check(0 <= self.batchtopk_row_warmup < 1, "dictionary.batchtopk_row_warmup",
               f"must be in [0, 1), got {self.batchtopk_row_warmup}: the steps after it set the inference threshold")
        _check(self.aux_k is None or self.aux_k > 0, "dictionary.aux_k", "must be > 0")
        _check(self.aux_k_coefficient >= 0, "dictionary.aux_k_coefficient", "must be >= 0")
        _check(self.dead_tokens > 0, "dictionary.dead_tokens", "must be > 0")
        _choice(self.b_dec_init, "dictionary.b_dec_init", ("geometric_median", "mean", "zeros"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the length of the run."""

    tokens: int = 2_000_000
    """Training tokens (activation rows); steps = tokens // batch_size."""
    batch_size: int = 4096
    """Rows per step (global, over all devices)."""
    optimizer: Literal["adam", "signum"] = "adam"
    """Update rule: `adam`, or `signum` (the sign of the gradient, each parameter moving by lr)."""
    lr: float | None = None
    """Peak learning rate; unset: chosen for the optimizer and d_sae (`train/optimizers.py`)."""
    lr_schedule: Literal["schedule_free", "constant", "cosine", "linear"] = "linear"
    """After warm-up: `schedule_free` (Defazio et al.'s averaging in place of a decay; the averaged
    parameters are evaluated and exported), constant, cosine decay to 0, or constant then linear
    decay to 0 over the last `lr_decay_fraction` of the steps."""
    lr_warmup_steps: int = 100
    """Linear learning-rate warm-up steps."""
    lr_decay_fraction: float = 0.2
    """Fraction of steps that the linear schedule spends decaying to zero."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up of the sparsity coefficient (relu, gated, jumprelu)."""
    grad_clip: float = 0.0
    """Global gradient-norm clip (0 disables)."""
    momentum: float = 0.9
    """Adam's beta1 or signum's momentum; with `lr_schedule: schedule_free`, the schedule-free
    interpolation weight instead (the inner update then runs without momentum)."""
    adam_b2: float = 0.999
    """Adam's beta2."""
    seed: int = 0
    """Seed of parameter init, data order and synthetic samples."""
    resample_every: int = 0
    """Resample dead features every this many steps (relu only; 0: never)."""
    init_batches: int = 8
    """Batches used to estimate the input norm and b_dec before training."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the encoder/decoder matmuls (parameters and optimizer state stay float32)."""
    memory_budget_gib: float = 0.0
    """CLTs: refuse, before allocating, a run whose estimated bytes per device (weights, optimizer
    state, gradients, activations) exceed this many GiB; 0: the device's own memory where JAX
    reports it, else no check."""

    def __post_init__(self) -> None:
        _check(self.tokens > 0, "train.tokens", f"must be > 0, got {self.tokens}")
        _check(self.batch_size > 0, "train.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.tokens >= self.batch_size, "train.tokens", f"{self.tokens} is less than one batch ({self.batch_size})")
        _check(self.lr is None or self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _choice(self.optimizer, "train.optimizer", ("adam", "signum"))
        _choice(self.lr_schedule, "train.lr_schedule", ("schedule_free", "constant", "cosine", "linear"))
        _check(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")
        _check(0 <= self.lr_decay_fraction <= 1, "train.lr_decay_fraction", "must be in [0, 1]")
        _check(self.sparsity_warmup_steps >= 0, "train.sparsity_warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(0 <= self.momentum < 1, "train.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.lr_schedule == "schedule_free":
            _check(self.momentum > 0, "train.momentum", "must be > 0 with lr_schedule: schedule_free")
        _check(0 <= self.adam_b2 < 1, "train.adam_b2", f"must be in [0, 1), got {self.adam_b2}")
        _check(self.resample_every >= 0, "train.resample_every", "must be >= 0")
        _check(self.init_batches >= 1, "train.init_batches", "must be >= 1")
        _choice(self.compute_dtype, "train.compute_dtype", ("float32", "bfloat16"))
        _check(self.memory_budget_gib >= 0, "train.memory_budget_gib", "must be >= 0 (0: the device's memory)")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: `data` x `model` devices. -1 on one axis takes the remaining devices."""

    data: int = -1
    """Devices over which the batch is split."""
    model: int = 1
    """Devices over which the d_sae axis is split."""

    def __post_init__(self) -> None:
        _check(self.data == -1 or self.data > 0, "mesh.data", f"must be -1 or > 0, got {self.data}")
        _check(self.model == -1 or self.model > 0, "mesh.model", f"must be -1 or > 0, got {self.model}")
        _check(not (self.data == -1 and self.model == -1), "mesh", "only one of mesh.data, mesh.model may be -1")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the run writes its metrics, checkpoints and exports."""

    dir: str = "runs/default"
    """Run directory: metrics.jsonl, checkpoints/, export/."""
    log_every: int = 50
    """Steps between metric lines."""
    checkpoint_every: int = 500
    """Steps between Orbax checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    eval_tokens: int = 65536
    """Tokens in the final evaluation."""
    ce_eval_contexts: int = 32
    """Held-out contexts for the loss-recovered evaluation (data.source `model`, or `cache` when the
    cache's model loads)."""
    export_saelens: bool = True
    """Write `export/saelens/` (cfg.json, sae_weights.safetensors) at the end."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        _check(self.log_every > 0, "output.log_every", "must be > 0")
        _check(self.checkpoint_every > 0, "output.checkpoint_every", "must be > 0")
        _check(self.keep_checkpoints >= 1, "output.keep_checkpoints", "must be >= 1")
        _check(self.eval_tokens > 0, "output.eval_tokens", "must be > 0")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole training run."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    dictionary: DictionaryConfig = dataclasses.field(default_factory=DictionaryConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        d = self.dictionary
        if d.aux_k is not None and d.d_sae is not None:
            _check(d.aux_k <= d.d_sae, "dictionary.aux_k", f"aux_k={d.aux_k} exceeds d_sae={d.d_sae}")
        has_target = self.data.target_site is not None or self.data.target_path is not None
        if d.architecture == "clt":
            _check(d.activation in ("jumprelu", "topk"), "dictionary.activation",
                   f"{d.activation!r} with architecture clt; a CLT trains jumprelu or topk")
            _check(self.data.source in ("model", "cache"), "data.source", f"{self.data.source!r} with architecture "
                   "clt; a CLT reads every covered layer's sites from data.source model or cache")
            _check(not has_target and self.data.site is None, "data.site",
                   "a CLT reads the sites of every layer it covers (dictionary.clt sets them); drop data.site and "
                   "data.target_site")
            return
        if self.data.source == "model":
            _check(self.data.site is not None, "data.site",
                   "required when data.source is 'model' (e.g. blocks.15.resid_post)")
        from jaxinterp.dictionaries.kinds import architecture

        if architecture(d.architecture).reads_target:
            _check(has_target, "dictionary.architecture", f"{d.architecture} needs a target: set data.target_site "
                   "(data.source model or cache) or data.target_path (data.source npy)")
        else:
            _check(not has_target, "data.target_site", f"a target is set but dictionary.architecture is "
                   f"{d.architecture!r}; set dictionary.architecture: transcoder")
        if self.data.source == "synthetic" and d.d_in is not None:
            _check(
                d.d_in == self.data.synthetic.d_in,
                "dictionary.d_in",
                f"{d.d_in} differs from data.synthetic.d_in={self.data.synthetic.d_in}; drop one of them",
            )


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts (YAML) with strict keys.


def _resolve_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp)
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(tp)
        _choice(value, key, allowed)
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str):
            try:
                if float(value).is_integer():
                    value = int(float(value))
            except ValueError:
                pass
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}{k}: unknown key{hint}")
    kwargs = {k: _coerce(v, _resolve_type(cls, k), prefix + k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    return text if value is None and text not in ("null", "~", "") else value


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, for example train.lr=1e-3")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = _parse_scalar(text.strip())


def config_from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw or {})


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides, validate, and return a frozen `Config`."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; pass an existing YAML file to --config")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data, dictionary, train, ...)")
    for o in overrides:
        apply_override(raw, o)
    return config_from_dict(raw)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
