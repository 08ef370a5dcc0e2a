"""Feature discovery: what each feature of a dictionary fires on, over a corpus."""

from jaxinterp.features.corpus import corpus_stats, locate
from jaxinterp.features.logits import LogitEffects, logit_effects
from jaxinterp.features.search import Contrast, TokenFeatures, contrast, fires_here
from jaxinterp.features.stats import (HIST_EDGES, FeatureStats, finalize_top, init_stats, load_stats, save_stats,
                                      update_stats)

__all__ = ["Contrast", "TokenFeatures", "contrast", "fires_here", "LogitEffects", "logit_effects", "corpus_stats", "locate", "HIST_EDGES", "FeatureStats", "finalize_top", "init_stats", "update_stats", "save_stats", "load_stats"]
