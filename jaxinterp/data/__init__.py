"""Activation sources for training: activation files and caches on disk (grain), live model
activations, and synthetic ground truth. The model-backed sources (`activations.ModelSource`,
`cache.CacheSource`) are imported when first asked for, since they load the language-model code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxinterp.config import Config
from jaxinterp.data.npy import DataError, NpySource, check_finite, open_activations
from jaxinterp.data.synthetic import SyntheticSource, sample, true_directions, write_npy

if TYPE_CHECKING:
    from jaxinterp.data.activations import ModelSource
    from jaxinterp.data.cache import CacheSource


def make_source(cfg: Config) -> NpySource | CacheSource | ModelSource | SyntheticSource:
    """The training stream named by `cfg.data.source`."""
    if cfg.data.source == "npy":
        return NpySource(cfg.data, cfg.train.batch_size, cfg.train.seed)
    from jaxinterp.dictionaries import clt as clt_kind

    clt = clt_kind.configured(cfg.dictionary)
    if cfg.data.source == "cache":
        from jaxinterp.data.cache import CacheSource

        return CacheSource(cfg.data, cfg.train.batch_size, cfg.train.seed, clt=cfg.dictionary.clt if clt else None)
    if cfg.data.source == "model":
        from jaxinterp.data.activations import ModelSource, open_site_model, source_sites

        if not clt:
            return ModelSource(cfg.data, cfg.train.batch_size, cfg.train.seed)
        model, tokenizer = open_site_model(cfg.data.model, ())
        return ModelSource(cfg.data, cfg.train.batch_size, cfg.train.seed, model=model, tokenizer=tokenizer,
                           sites=source_sites(cfg, model.cfg.n_layers))
    return SyntheticSource(cfg.data.synthetic, cfg.train.batch_size, cfg.train.seed)


__all__ = ["DataError", "NpySource", "SyntheticSource", "check_finite", "make_source", "open_activations", "sample",
           "true_directions", "write_npy"]
