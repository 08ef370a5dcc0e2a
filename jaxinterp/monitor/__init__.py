"""Feature drift monitoring: pure Welford statistics, windowed drift checks, reports, baselines,
metrics export and a sparse feature cache."""

from jaxinterp.monitor.drift import DriftState, drift_report, observe
from jaxinterp.monitor.feature_cache import FeatureCache
from jaxinterp.monitor.metrics import MetricsExporter
from jaxinterp.monitor.stats import DriftMetrics, Stats, drift_metrics, empty, frequency_kl, merge, update, variance

__all__ = ["DriftMetrics", "DriftState", "FeatureCache", "MetricsExporter", "Stats", "drift_metrics", "drift_report", "empty", "frequency_kl", "merge",
           "observe", "update", "variance"]
