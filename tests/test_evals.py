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


def test_outlier_rows_are_left_out_of_the_metrics_the_splice_and_training_batches():
    """`data.outlier_norm`: rows far above their batch's median norm (a model's massive activations)
    count in no metric, keep their value under the splice, and are replaced in a training batch."""
    from jaxinterp.config import ConfigError, config_from_dict

    spec, params = _dictionary("topk")
    x = np.asarray(jax.random.normal(jax.random.key(1), (24, D)), np.float32) * 2.0 + 0.5
    big = x.copy()
    big[[3, 17]] *= 400.0  # two massive rows, 400x the others' norm
    typical = np.delete(big, [3, 17], axis=0)
    # the padded short batch too: padding is neither typical nor an outlier
    got = evals.evaluate(spec, params, [big[:16], big[16:]], outlier_norm=10.0)
    ref = _reference(spec, params, typical)
    assert got["eval_tokens"] == 22 and got["outlier_rows"] == 2
    for name in ("mse", "explained_variance", "cossim", "l0", "l2_ratio"):
        assert got[name] == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name
    kept = evals.evaluate(spec, params, [big[:16], big[16:]])
    assert "outlier_rows" not in kept and kept["mse"] > 100 * got["mse"]

    keep = np.asarray(dl.typical_rows(spec, jnp.asarray(big), 10.0))
    assert keep.sum() == 22 and not keep[3] and not keep[17]
    replaced = np.asarray(dl.replace_outliers(spec, jnp.asarray(big), 10.0))
    np.testing.assert_array_equal(replaced[keep], big[keep])
    np.testing.assert_array_equal(replaced[[3, 17]], typical[:2])  # the first typical rows, in order
    np.testing.assert_array_equal(np.asarray(dl.replace_outliers(spec, jnp.asarray(big), 0.0)), big)

    y = jnp.asarray(big.reshape(2, 12, D))  # position 0 of each context is BOS, kept as it is
    out = np.asarray(evals.splice_fn(spec, outlier_norm=10.0)(y, params, None))
    recon = np.asarray(dl.reconstruct(spec, params, y.reshape(-1, D))).reshape(2, 12, D)
    outlier = np.zeros((2, 12), bool)
    outlier[0, 3] = outlier[1, 5] = True
    np.testing.assert_allclose(out[outlier], big.reshape(2, 12, D)[outlier])
    inner = ~outlier & (np.arange(12) > 0)
    np.testing.assert_allclose(out[inner], recon[inner], rtol=1e-5, atol=1e-5)

    with pytest.raises(ConfigError, match="data.outlier_norm"):
        config_from_dict({"data": {"outlier_norm": 0.5}})
