"""Toy superposition: sparse combinations of known unit-norm directions.

Axes: `B` batch, `N` true features, `D` d_in.

A sample is `x = sum_n a_n * c_n * u_n + noise`, where the `u_n` [N, D] are random unit vectors,
`a_n ~ Bernoulli(p_active)` and `c_n` a magnitude. Features come in groups of `group_size`: with
probability `group_correlation` a feature copies its group's shared Bernoulli draw instead of its
own, so members of a group tend to fire together.

Sampling is sparse and runs on the host (NumPy), so a batch costs O(active features x D), not the
O(B x N x D) of a dense [B, N] draw and matmul, and never competes with the train step for an XLA
program: the ones of a [B, N] Bernoulli(p) matrix are a Binomial(B N, p) count of positions drawn
uniformly without replacement (exactly iid Bernoulli), and `x` is a sparse [B, N] @ [N, D] product.
Batch `s` of a stream is a pure function of (seed, s), so a stream resumes exactly from its step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from jaxinterp.config import SyntheticConfig
from jaxinterp.data.batches import IndexedSource

_TRAIN, _EVAL, _FILE = 0, 1, 2
"""Namespaces of the seeded streams: training batches, held-out batches, `write_npy` rows."""


def true_directions(cfg: SyntheticConfig) -> np.ndarray:
    """The ground-truth directions [N, D] (unit norm), fixed by `cfg.seed`."""
    # A stream of its own: parameter init draws from key(train.seed) and must never equal this.
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0x5EED)
    u = jax.random.normal(key, (cfg.n_features, cfg.d_in), jnp.float32)
    return np.asarray(u / jnp.linalg.norm(u, axis=-1, keepdims=True))


def _bernoulli_ones(rng: np.random.Generator, rows: int, cols: int, p: float) -> np.ndarray:
    """Flat indices of the ones of a [rows, cols] matrix of iid Bernoulli(p) draws."""
    total = rows * cols
    return rng.choice(total, size=rng.binomial(total, p), replace=False, shuffle=False)


def active_features(rng: np.random.Generator, cfg: SyntheticConfig, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, features) of the active entries of one batch, each int64 [nnz], sorted by row then feature."""
    n = cfg.n_features
    flat = _bernoulli_ones(rng, batch_size, n, cfg.p_active)
    if cfg.group_size > 1 and cfg.group_correlation > 0:
        copies = rng.random(n) < cfg.group_correlation
        flat = flat[~copies[flat % n]]
        members = np.flatnonzero(copies)  # ascending, so grouped
        n_groups = -(-n // cfg.group_size)
        per_group = np.bincount(members // cfg.group_size, minlength=n_groups)
        first = np.cumsum(per_group) - per_group
        g_rows, g = np.divmod(_bernoulli_ones(rng, batch_size, n_groups, cfg.p_active), n_groups)
        reps = per_group[g]
        offset = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        flat = np.concatenate([flat, np.repeat(g_rows, reps) * n + members[np.repeat(first[g], reps) + offset]])
    return np.divmod(np.sort(flat), n)


def sample(rng: np.random.Generator, directions_nd: np.ndarray, cfg: SyntheticConfig, batch_size: int) -> np.ndarray:
    """One batch [B, D] float32 of toy-superposition activations."""
    rows, feats = active_features(rng, cfg, batch_size)
    m = cfg.magnitude_mean
    if cfg.magnitude == "uniform":
        mag = rng.uniform(0.0, 2 * m, len(rows))
    elif cfg.magnitude == "exponential":
        mag = rng.exponential(m, len(rows))
    else:
        mag = np.full(len(rows), m)
    indptr = np.searchsorted(rows, np.arange(batch_size + 1))
    codes = scipy.sparse.csr_matrix((mag.astype(np.float32), feats, indptr), shape=(batch_size, cfg.n_features))
    x = np.asarray(codes @ directions_nd, np.float32)
    if cfg.noise_std > 0:
        x += np.float32(cfg.noise_std) * rng.standard_normal(x.shape, np.float32)
    return x


class SyntheticSource(IndexedSource):
    """An endless, resumable stream of toy-superposition batches."""

    def __init__(self, cfg: SyntheticConfig, batch_size: int, seed: int):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.d_in = cfg.d_in
        self.true_directions = true_directions(cfg)

    def batch(self, i: int) -> np.ndarray:
        """Training batch `i` [B, D]."""
        return sample(np.random.default_rng([self.seed, _TRAIN, i]), self.true_directions, self.cfg, self.batch_size)

    def describe(self, i: int, row: int) -> str:
        """Where row `row` of training batch `i` comes from, for error messages."""
        return f"synthetic data (data.synthetic), batch {i}, row {row}"

    def eval_batches(self, n_tokens: int, batch_size: int):
        """Held-out batches: a stream the training batches never use."""
        for i in range(max(1, n_tokens // batch_size)):
            yield sample(np.random.default_rng([self.seed, _EVAL, i]), self.true_directions, self.cfg, batch_size)


def write_npy(path: str, cfg: SyntheticConfig, n_tokens: int, *, seed: int = 0, dtype: str = "float32",
              batch_size: int = 65536) -> tuple[str, str]:
    """Write `n_tokens` toy-superposition rows to `path` and the true directions beside it
    (`<stem>.directions.npy`); returns both paths. For training from `data.source: npy`."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(n_tokens, cfg.d_in))
    dirs = true_directions(cfg)
    for i, start in enumerate(range(0, n_tokens, batch_size)):
        rows = min(batch_size, n_tokens - start)
        out[start : start + rows] = sample(np.random.default_rng([seed, _FILE, i]), dirs, cfg, rows).astype(np_dtype)
    out.flush()
    dir_path = str(path)[: -len(".npy")] + ".directions.npy" if str(path).endswith(".npy") else str(path) + ".directions.npy"
    np.save(dir_path, dirs)
    return str(path), dir_path
