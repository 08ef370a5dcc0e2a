"""Activation sources for training: activation files on disk (grain) and synthetic ground truth."""

from __future__ import annotations

from jaxinterp.config import Config
from jaxinterp.data.npy import DataError, NpySource, open_activations
from jaxinterp.data.synthetic import SyntheticSource, sample, true_directions, write_npy


def make_source(cfg: Config) -> NpySource | SyntheticSource:
    """The training stream named by `cfg.data.source`."""
    if cfg.data.source == "npy":
        return NpySource(cfg.data, cfg.train.batch_size, cfg.train.seed)
    if cfg.data.source == "model":
        from jaxinterp.data.activations import ModelSource

        return ModelSource(cfg.data, cfg.train.batch_size, cfg.train.seed)
    return SyntheticSource(cfg.data.synthetic, cfg.train.batch_size, cfg.train.seed)


__all__ = ["DataError", "NpySource", "SyntheticSource", "make_source", "open_activations", "sample",
           "true_directions", "write_npy"]
