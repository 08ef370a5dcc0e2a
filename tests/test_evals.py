import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp import dictionaries as dl
from jaxinterp import evals

D, F = 8, 32


def _dictionary(kind):
    spec = dl.DictionarySpec(activation=kind, d_in=D, d_sae=F, k=4)
    keys = jax.random.split(jax.random.key(0), 3)
    params = dl.init(keys[0], spec) | {"b_enc": 0.2 * jax.random.normal(keys[1], (F,)),
                                       "b_dec": 0.1 * jax.random.normal(keys[2], (D,)),
                                       "norm_scale": jnp.float32(0.7)}
    return spec, params


def _reference(spec, params, x):
    """The metrics computed on all rows at once, in numpy."""
    acts = np.asarray(dl.encode(spec, params, jnp.asarray(x)), np.float64)
    x_hat = np.asarray(dl.decode(spec, params, jnp.asarray(acts, jnp.float32)), np.float64)
    x = np.asarray(x, np.float64)
    var = np.sum((x - x.mean(0)) ** 2)
    cos = np.sum(x * x_hat, -1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(x_hat, axis=-1))
    return {"mse": np.mean((x - x_hat) ** 2), "explained_variance": 1 - np.sum((x - x_hat) ** 2) / var,
            "cossim": cos.mean(), "l0": np.mean(np.sum(acts > 0, -1)), "l1": np.mean(np.sum(np.abs(acts), -1)),
            "frac_alive": np.mean((acts > 0).any(0)),
            "l2_ratio": np.mean(np.linalg.norm(x_hat, axis=-1) / np.linalg.norm(x, axis=-1))}


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_evaluate_over_uneven_batches_equals_the_metrics_of_all_rows(kind):
    spec, params = _dictionary(kind)
    x = np.asarray(jax.random.normal(jax.random.key(1), (23, D)), np.float32) * 2.0 + 0.5
    # the short last batch is zero-padded inside: the padding must not count
    got = evals.evaluate(spec, params, [x[:8], x[8:16], x[16:]])
    ref = _reference(spec, params, x)
    assert got["eval_tokens"] == 23
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert sum(got["feature_density_histogram"]["counts"]) + got["feature_density_histogram"]["never_fired"] == F


def test_evaluate_without_batches_names_the_fix():
    spec, params = _dictionary("topk")
    with pytest.raises(ValueError, match="raise output.eval_tokens"):
        evals.evaluate(spec, params, [])
