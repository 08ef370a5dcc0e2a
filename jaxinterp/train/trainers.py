"""What the training loop needs from a dictionary architecture, as one value per run.

`loop.train` is written once: data -> sharded step -> metrics, checkpoints, evaluation, export.
A `Trainer` supplies the parts that differ between a single-site dictionary (SAEs and
transcoders, `step.py`) and a cross-layer transcoder (`clt_step.py`): the spec, the state, the
compiled step, the final evaluation and the artifacts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxinterp import dictionaries as dl
from jaxinterp import evals
from jaxinterp.config import Config
from jaxinterp.dictionaries import clt
from jaxinterp.train import clt_step, step
from jaxinterp.train.state import TrainState


@dataclasses.dataclass
class SAETrainer:
    """SAEs, transcoders and skip transcoders (one input site, one output)."""

    cfg: Config
    spec: dl.DictionarySpec

    @property
    def d_sae(self) -> int:
        return self.spec.d_sae

    @property
    def batch_width(self) -> int:
        return self.spec.batch_width

    def spec_json(self) -> dict:
        return dataclasses.asdict(self.spec)

    def describe(self) -> str:
        s = self.spec
        return f"{s.architecture} {s.activation} d_in={s.d_in} d_out={s.d_out} d_sae={s.d_sae}"

    def preflight(self, mesh, log) -> None:
        del mesh, log

    def init_state(self, init_batches: list) -> TrainState:
        return step.init_state(self.cfg, self.spec, init_batches)

    def build_step(self, mesh, abstract_state: TrainState, *, max_traces: int | None = None) -> step.StepFns:
        return step.build_step(self.cfg, self.spec, mesh, abstract_state, max_traces=max_traces)

    def resampler(self, fns: step.StepFns) -> Callable | None:
        if not (self.spec.kind.resamples_dead and self.cfg.train.resample_every > 0):
            return None
        cfg, spec = self.cfg, self.spec
        return jax.jit(lambda s, x, k: step.resample_dead(cfg, spec, s, x, k),
                       in_shardings=(fns.state_sharding, fns.batch_sharding, None), out_shardings=fns.state_sharding)

    def final_evaluation(self, state: TrainState, source) -> dict:
        from jaxinterp.train.loop import source_site

        cfg, spec = self.cfg, self.spec
        params = jax.device_get(state.dictionary)
        batches = source.eval_batches(cfg.output.eval_tokens, cfg.train.batch_size)
        result = evals.evaluate(spec, params, batches, true_directions=source.true_directions,
                                outlier_norm=cfg.data.outlier_norm)
        site = source_site(cfg, source)
        if getattr(source, "eval_contexts", None) is not None and site is not None:
            ctx = source.eval_contexts[: cfg.output.ce_eval_contexts]
            result |= evals.loss_recovered(source.model, spec, params, site, ctx,
                                           target_site=getattr(source, "target_site", None),
                                           outlier_norm=cfg.data.outlier_norm)
        return result

    def export(self, run: Path, state: TrainState, source, log) -> None:
        from jaxinterp.interop.saelens import ExportError, export_saelens, hook_name_for_site
        from jaxinterp.train.loop import run_dictionary, source_site

        cfg, spec = self.cfg, self.spec
        params = jax.device_get(state.dictionary)
        dl.save(run / "dictionary", run_dictionary(cfg, spec, params, source))
        if not cfg.output.export_saelens:
            return
        try:
            export_saelens(run / "export" / "saelens", spec, params,
                           hook_name=hook_name_for_site(source_site(cfg, source)),
                           hook_name_out=hook_name_for_site(getattr(source, "target_site", None)),
                           model_name=cfg.data.model if cfg.data.source == "model" else getattr(source, "model_name", "unknown"),
                           extra_metadata={"data_source": cfg.data.source})
        except ExportError as e:
            log(f"export: no SAELens export ({e})")


@dataclasses.dataclass
class CLTTrainer:
    """Cross-layer transcoders: rows of every covered layer's input and mlp_out."""

    cfg: Config
    spec: clt.CLTSpec

    @property
    def d_sae(self) -> int:
        return self.spec.d_sae

    @property
    def batch_width(self) -> int:
        return 2 * self.spec.n_layers * self.spec.d_model

    def spec_json(self) -> dict:
        return {"kind": "clt", **dataclasses.asdict(self.spec)}

    def describe(self) -> str:
        s = self.spec
        return (f"clt {s.activation} layers {s.first_layer}..{s.first_layer + s.n_layers - 1} ({s.input_point} -> "
                f"mlp_out, span {s.span or s.n_layers}{', skip' if s.skip else ''}) d_model={s.d_model} d_sae={s.d_sae} "
                "per layer")

    def preflight(self, mesh, log) -> None:
        clt_step.preflight(self.cfg, self.spec, mesh, log)

    def init_state(self, init_batches: list) -> TrainState:
        return clt_step.init_state(self.cfg, self.spec, init_batches)

    def build_step(self, mesh, abstract_state: TrainState, *, max_traces: int | None = None) -> step.StepFns:
        return clt_step.build_step(self.cfg, self.spec, mesh, abstract_state, max_traces=max_traces)

    def resampler(self, fns) -> None:
        return None

    def final_evaluation(self, state: TrainState, source) -> dict:
        from jaxinterp.circuits.fidelity import replacement_fidelity, row_fidelity

        cfg, spec = self.cfg, self.spec
        params = jax.device_get(state.dictionary)
        dead = np.asarray(jax.device_get(state.tokens_since_fired)) >= cfg.dictionary.dead_tokens
        result: dict[str, Any] = {"dead_fraction_per_layer": dead.mean(1).tolist()}
        if getattr(source, "eval_contexts", None) is not None and source.model is not None:
            ctx = source.eval_contexts[: cfg.output.ce_eval_contexts]
            result |= replacement_fidelity(source.model, spec, params, ctx)
        else:
            result |= row_fidelity(spec, params, source.eval_batches(cfg.output.eval_tokens, cfg.train.batch_size))
        result["dead_fraction_seen_in_eval"] = result.pop("dead_fraction")
        return result

    def export(self, run: Path, state: TrainState, source, log) -> None:
        from jaxinterp.interop.circuit_tracer import CircuitTracerError, export_clt

        cfg, spec = self.cfg, self.spec
        params = jax.device_get(state.dictionary)
        model = cfg.data.model if cfg.data.source == "model" else getattr(source, "model_name", None)
        dl.save(run / "dictionary", dl.CLTDictionary(spec, params, model=model, metadata={
            "data_source": cfg.data.source, "step": int(cfg.train.steps), "trained_with": "jaxinterp"}))
        try:
            export_clt(run / "export" / "circuit_tracer", spec, params, model_name=model or "")
        except CircuitTracerError as e:
            log(f"export: no circuit-tracer export ({e})")


def _sae_trainer(cfg: Config, source) -> SAETrainer:
    return SAETrainer(cfg, step.make_spec(cfg, source.d_in, getattr(source, "d_out", None)))


def _clt_trainer(cfg: Config, source) -> CLTTrainer:
    return CLTTrainer(cfg, clt_step.make_spec(cfg, len(source.sites) // 2, source.d_in))


TRAINERS: dict[str, Callable] = {"clt": _clt_trainer}
"""Trainer factories by `dictionary.architecture`; the others (sae, transcoder, skip_transcoder)
train with `SAETrainer`."""


def make_trainer(cfg: Config, source) -> SAETrainer | CLTTrainer:
    """The trainer for `cfg`'s architecture, shaped by the data `source` provides."""
    return TRAINERS.get(cfg.dictionary.architecture, _sae_trainer)(cfg, source)


def trainer_from_run(cfg: Config, spec_json: dict) -> SAETrainer | CLTTrainer:
    """The trainer of a run directory's `dictionary.json`."""
    if spec_json.get("kind") == "clt":
        return CLTTrainer(cfg, clt.CLTSpec(**{k: v for k, v in spec_json.items() if k != "kind"}))
    return SAETrainer(cfg, dl.DictionarySpec(**spec_json))
