"""Feature discovery: what each feature of a dictionary fires on, over a corpus."""

from jaxinterp.features.corpus import corpus_stats, locate
from jaxinterp.features.logits import LogitEffects, logit_effects
from jaxinterp.features.search import Contrast, TokenFeatures, TokenMatches, by_token, contrast, fires_here, matching_tokens
from jaxinterp.features.stats import (HIST_EDGES, STAT_AXES, FeatureStats, finalize_samples, finalize_top, init_stats,
                                      load_stats, place_stats, quantile_groups, sample_key, save_stats, sharded_update,
                                      update_stats, update_stats_sparse)

__all__ = ["Contrast", "TokenFeatures", "TokenMatches", "by_token", "matching_tokens", "contrast", "fires_here", "LogitEffects", "logit_effects", "corpus_stats", "locate", "HIST_EDGES", "FeatureStats", "finalize_top", "finalize_samples", "quantile_groups", "sample_key", "STAT_AXES", "sharded_update", "place_stats", "init_stats", "update_stats", "update_stats_sparse", "save_stats", "load_stats"]
