"""Toy superposition: sparse combinations of known unit-norm directions.

Axes: `B` batch, `N` true features, `D` d_in.

A sample is `x = sum_n a_n * c_n * u_n + noise`, where the `u_n` [N, D] are random unit vectors,
`a_n ~ Bernoulli(p_active)` and `c_n` a magnitude. Features come in groups of `group_size`: with
probability `group_correlation` a feature copies its group's shared Bernoulli draw instead of its
own, so members of a group tend to fire together. Batch `s` of a stream is a pure function of
(seed, s), so a stream resumes exactly from its step counter.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.config import SyntheticConfig


def true_directions(cfg: SyntheticConfig) -> np.ndarray:
    """The ground-truth directions [N, D] (unit norm), fixed by `cfg.seed`."""
    # A stream of its own: parameter init draws from key(train.seed) and must never equal this.
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0x5EED)
    u = jax.random.normal(key, (cfg.n_features, cfg.d_in), jnp.float32)
    return np.asarray(u / jnp.linalg.norm(u, axis=-1, keepdims=True))


@partial(jax.jit, static_argnames=("cfg", "batch_size"))
def sample(key: jax.Array, directions_nd: jax.Array, cfg: SyntheticConfig, batch_size: int) -> jax.Array:
    """One batch [B, D] of toy-superposition activations."""
    k_on, k_group, k_copy, k_mag, k_noise = jax.random.split(key, 5)
    n = cfg.n_features
    on = jax.random.bernoulli(k_on, cfg.p_active, (batch_size, n))
    if cfg.group_size > 1 and cfg.group_correlation > 0:
        n_groups = -(-n // cfg.group_size)
        group_on = jax.random.bernoulli(k_group, cfg.p_active, (batch_size, n_groups))
        group_on = jnp.repeat(group_on, cfg.group_size, axis=1)[:, :n]
        copy = jax.random.bernoulli(k_copy, cfg.group_correlation, (1, n))
        on = jnp.where(copy, group_on, on)
    if cfg.magnitude == "uniform":
        mag = jax.random.uniform(k_mag, (batch_size, n), maxval=2 * cfg.magnitude_mean)
    elif cfg.magnitude == "exponential":
        mag = jax.random.exponential(k_mag, (batch_size, n)) * cfg.magnitude_mean
    else:
        mag = jnp.full((batch_size, n), cfg.magnitude_mean)
    x = jnp.where(on, mag, 0.0) @ directions_nd
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * jax.random.normal(k_noise, x.shape)
    return x


class SyntheticSource:
    """An endless, resumable stream of toy-superposition batches."""

    host_side = False
    """Batches are computed by an XLA program (the train loop must not overlap it with a step)."""

    def __init__(self, cfg: SyntheticConfig, batch_size: int, seed: int):
        self.cfg, self.batch_size = cfg, batch_size
        self.d_in = cfg.d_in
        self.true_directions = true_directions(cfg)
        self._dirs = jnp.asarray(self.true_directions)
        self._key = jax.random.key(seed)
        self._step = 0

    def __iter__(self):
        return self

    def __next__(self) -> jax.Array:
        x = sample(jax.random.fold_in(self._key, self._step), self._dirs, self.cfg, self.batch_size)
        self._step += 1
        return x

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])

    def eval_batches(self, n_tokens: int, batch_size: int):
        """Held-out batches: a key the training stream never uses."""
        key = jax.random.fold_in(self._key, -1 & 0x7FFFFFFF)
        for i in range(max(1, n_tokens // batch_size)):
            yield sample(jax.random.fold_in(key, i), self._dirs, self.cfg, batch_size)


def write_npy(path: str, cfg: SyntheticConfig, n_tokens: int, *, seed: int = 0, dtype: str = "float32",
              batch_size: int = 65536) -> tuple[str, str]:
    """Write `n_tokens` toy-superposition rows to `path` and the true directions beside it
    (`<stem>.directions.npy`); returns both paths. For training from `data.source: npy`."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(n_tokens, cfg.d_in))
    dirs = true_directions(cfg)
    key = jax.random.key(seed)
    for i, start in enumerate(range(0, n_tokens, batch_size)):
        rows = min(batch_size, n_tokens - start)
        out[start : start + rows] = np.asarray(sample(jax.random.fold_in(key, i), jnp.asarray(dirs), cfg, rows)).astype(np_dtype)
    out.flush()
    dir_path = str(path)[: -len(".npy")] + ".directions.npy" if str(path).endswith(".npy") else str(path) + ".directions.npy"
    np.save(dir_path, dirs)
    return str(path), dir_path
