"""Sharded training of sparse dictionaries: mesh rules, state, step, loop, checkpoints."""

from jaxinterp.train import clt_step
from jaxinterp.train.loop import TrainingError, checkpoint_artifact, checkpoint_dictionary, summary_line, train
from jaxinterp.train.sharding import LOGICAL_RULES, PARAM_AXES, make_mesh
from jaxinterp.train.state import TrainState
from jaxinterp.train.step import build_step, init_state, make_spec, train_step

__all__ = ["LOGICAL_RULES", "clt_step", "PARAM_AXES", "TrainState", "TrainingError", "build_step", "init_state",
           "checkpoint_artifact", "checkpoint_dictionary", "make_mesh", "make_spec", "summary_line", "train", "train_step"]
