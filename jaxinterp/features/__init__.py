"""Feature discovery: what each feature of a dictionary fires on, over a corpus."""

from jaxinterp.features.stats import HIST_EDGES, FeatureStats, finalize_top, init_stats, update_stats

__all__ = ["HIST_EDGES", "FeatureStats", "finalize_top", "init_stats", "update_stats"]
