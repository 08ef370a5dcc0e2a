"""The training loop: data -> sharded step -> metrics, checkpoints, final evaluation, export."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from tqdm import tqdm

from jaxinterp import dictionaries as dl
from jaxinterp import evals
from jaxinterp.config import Config, config_to_dict, load_config
from jaxinterp.data import make_source
from jaxinterp.interop.saelens import export_saelens, hook_name_for_site
from jaxinterp.train import sharding
from jaxinterp.train.checkpoint import Checkpointer, abstract_like
from jaxinterp.train.metrics import MetricsWriter
from jaxinterp.train.step import build_step, init_state, make_spec, place_state, resample_dead
from jaxinterp.train.state import TrainState


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a run directory in the way); the message says what to do."""


def _spec_to_json(spec: dl.DictionarySpec) -> dict:
    return dataclasses.asdict(spec)


def load_dictionary(run_dir: str | Path, step: int | None = None) -> tuple[dl.DictionarySpec, dl.Params]:
    """(spec, params) of a run's latest (or given) checkpoint, unsharded."""
    run = Path(run_dir)
    spec_path = run / "dictionary.json"
    if not spec_path.is_file():
        raise FileNotFoundError(f"{spec_path} not found; is {str(run)!r} a jaxinterp run directory?")
    spec = dl.DictionarySpec(**json.loads(spec_path.read_text()))
    cfg = load_config(run / "config.yaml")
    dummy = [np.zeros((1, spec.d_in), np.float32)]
    abstract = jax.eval_shape(lambda: init_state(cfg, spec, dummy))
    ckpt = Checkpointer(run / "checkpoints", keep=cfg.output.keep_checkpoints)
    target = abstract_like(abstract, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract))
    state, _ = ckpt.restore(target, step)
    ckpt.close()
    return spec, state.dictionary


def _check_batch(cfg: Config, mesh) -> None:
    n_data = mesh.shape["data"]
    if cfg.train.batch_size % n_data:
        raise TrainingError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by mesh.data={n_data}; "
            "pick a multiple of the data-parallel size"
        )


def train(cfg: Config, *, resume: bool = False, log=print, max_traces: int | None = None) -> dict:
    """Train a dictionary as configured; returns the final evaluation (also the last line of
    `<output.dir>/metrics.jsonl`)."""
    run = Path(cfg.output.dir)
    ckpt_dir = run / "checkpoints"
    source = make_source(cfg)
    spec = make_spec(cfg, source.d_in)
    mesh = sharding.make_mesh(cfg.mesh)
    _check_batch(cfg, mesh)

    existing = Checkpointer(ckpt_dir, keep=cfg.output.keep_checkpoints) if ckpt_dir.exists() else None
    latest = existing.latest_step() if existing else None
    if latest is not None and not resume:
        existing.close()
        raise TrainingError(
            f"{run} already holds checkpoints (step {latest}); pass --resume to continue that run, "
            "or choose another output.dir"
        )
    if resume and latest is None:
        log(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (run / "dictionary.json").write_text(json.dumps(_spec_to_json(spec), indent=2) + "\n")
    ckpt = existing or Checkpointer(ckpt_dir, keep=cfg.output.keep_checkpoints)

    if latest is not None:
        dummy = [np.zeros((1, spec.d_in), np.float32)]
        abstract = jax.eval_shape(lambda: init_state(cfg, spec, dummy))
        fns = build_step(cfg, spec, mesh, abstract, max_traces=max_traces)
        state, data_state = ckpt.restore(abstract_like(abstract, fns.state_sharding), latest)
        source.set_state(data_state)
        log(f"resumed from step {latest} of {cfg.train.steps}")
    else:
        init_batches = [next(source) for _ in range(cfg.train.init_batches)]
        state = init_state(cfg, spec, init_batches)
        fns = build_step(cfg, spec, mesh, state, max_traces=max_traces)
        state = place_state(state, fns)

    total = cfg.train.steps
    start = int(state.step)
    writer = MetricsWriter(run, truncate_after_step=start if latest is not None else None)
    resample = None
    if spec.activation == "relu" and cfg.train.resample_every > 0:
        resample = jax.jit(
            lambda s, x, k: resample_dead(cfg, spec, s, x, k),
            in_shardings=(fns.state_sharding, fns.batch_sharding, None),
            out_shardings=fns.state_sharding,
        )
    log(f"training {spec.activation} d_in={spec.d_in} d_sae={spec.d_sae} for {total} steps "
        f"({cfg.train.tokens:,} tokens) on {sharding.describe(mesh)}")

    bar = tqdm(total=total, initial=start, disable=not cfg.output.progress, unit="step", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start
    metrics = None
    for step in range(start, total):
        if metrics is not None and not source.host_side:
            # A source that runs its own XLA program (synthetic) waits for the step in flight: on a
            # multi-device CPU, a second program competing for the same thread pool can starve the
            # step's all-reduce. Host-side sources (npy) read the next batch while the step runs.
            jax.block_until_ready(metrics)
        x = jax.device_put(next(source), fns.batch_sharding)
        state, metrics = fns.step(state, x)
        done = step + 1
        if resample is not None and done % cfg.train.resample_every == 0:
            state = resample(state, x, jax.random.fold_in(jax.random.key(cfg.train.seed), done))
        if done % cfg.output.log_every == 0 or done == total:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            m["tokens_per_s"] = (done - step_last) * cfg.train.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            if not math.isfinite(m["loss"]):
                ckpt.close()
                raise TrainingError(
                    f"loss became {m['loss']} at step {done}; lower train.lr or raise train.grad_clip "
                    f"(the last good checkpoint is in {ckpt_dir})"
                )
            writer.write({"step": done, "tokens": done * cfg.train.batch_size, **m})
            bar.set_postfix(tok_s=f"{m['tokens_per_s']:.0f}", loss=f"{m['loss']:.4g}", l0=f"{m['l0']:.1f}",
                            dead=f"{m['dead_fraction']:.3f}", refresh=False)
        if done % cfg.output.checkpoint_every == 0 and done != total:
            jax.block_until_ready(state)
            ckpt.save(done, state, source.get_state())
        bar.update(1)
    bar.close()
    jax.block_until_ready(state)
    if ckpt.latest_step() != total:
        ckpt.save(total, state, source.get_state(), force=True)
    ckpt.wait()

    final = final_evaluation(cfg, spec, state, source)
    writer.write(final)
    writer.close()
    ckpt.close()
    if cfg.output.export_saelens:
        export_saelens(
            run / "export" / "saelens",
            spec,
            jax.device_get(state.dictionary),
            hook_name=hook_name_for_site(source_site(cfg, source)),
            model_name=cfg.data.model if cfg.data.source == "model" else getattr(source, "model_name", "unknown"),
            extra_metadata={"data_source": cfg.data.source},
        )
    return final


def source_site(cfg: Config, source) -> str | None:
    """The site the activations come from: the source's own (a cache records it), else `data.site`."""
    return getattr(source, "site", None) or cfg.data.site


def final_evaluation(cfg: Config, spec: dl.DictionarySpec, state: TrainState, source) -> dict:
    params = jax.device_get(state.dictionary)
    batches = source.eval_batches(cfg.output.eval_tokens, cfg.train.batch_size)
    result = evals.evaluate(spec, params, batches, true_directions=source.true_directions)
    site = source_site(cfg, source)
    if getattr(source, "eval_contexts", None) is not None and site is not None:
        ctx = source.eval_contexts[: cfg.output.ce_eval_contexts]
        result |= evals.loss_recovered(source.model, spec, params, site, ctx)
    dead = np.asarray(jax.device_get(state.tokens_since_fired)) >= cfg.dictionary.dead_tokens
    return {
        "final": True,
        "step": int(state.step),
        "tokens": int(state.step) * cfg.train.batch_size,
        "dead_fraction": float(np.mean(dead)),
        **result,
    }


def summary_line(final: dict) -> str:
    keys = ["ce_loss_score", "kl_div_score", "explained_variance", "mse", "cossim", "l2_ratio", "l0", "frac_alive",
            "dead_fraction", "mmcs"]
    return "final: " + "  ".join(f"{k}={final[k]:.4g}" for k in keys if k in final)
