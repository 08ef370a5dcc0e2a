"""Steering: interventions at intercept sites as data (feature and raw-vector edits), the
dictionary registry, and contrastive activation addition."""

from jaxinterp.steering.edits import FeatureSlots, SiteSteering, VectorSlots, feature_delta, steer_fn, vector_edit
from jaxinterp.steering.spec import (DictionaryRegistry, SteeringError, SteeringVector, compile_steering,
                                     feature_max_acts, load_spec_file, parse_steer)

__all__ = ["DictionaryRegistry", "FeatureSlots", "SiteSteering", "SteeringError", "SteeringVector", "VectorSlots",
           "compile_steering", "feature_max_acts", "feature_delta", "load_spec_file", "parse_steer", "steer_fn", "vector_edit"]
