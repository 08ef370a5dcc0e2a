"""The training loop: data -> sharded step -> metrics, checkpoints, final evaluation, export."""

from __future__ import annotations

import collections
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import yaml
from tqdm import tqdm

from jaxinterp import dictionaries as dl
from jaxinterp import distributed
from jaxinterp.config import Config, config_to_dict, load_config
from jaxinterp.data import check_finite, make_source
from jaxinterp.data.batches import RowShare
from jaxinterp.errors import JaxinterpError, MissingFileError
from jaxinterp.train import sharding
from jaxinterp.train.checkpoint import Checkpointer, abstract_like
from jaxinterp.train.health import fault_message, read_fault
from jaxinterp.train.metrics import MetricsWriter
from jaxinterp.train.optimizers import resolved_lr
from jaxinterp.train.step import place_state
from jaxinterp.train.trainers import make_trainer, trainer_from_run
from jaxinterp.train.state import TrainState


class TrainingError(JaxinterpError, RuntimeError):
    """Training cannot go on (NaN loss, a run directory in the way); the message says what to do."""


def checkpoint_dictionary(run_dir: str | Path, step: int | None = None) -> tuple:
    """(spec, params) of a run's latest (or given) checkpoint, unsharded (a finished run's dictionary
    is `dl.load_dictionary(run_dir)`, which needs neither the config nor the optimizer state)."""
    run = Path(run_dir)
    spec_path = run / "dictionary.json"
    if not spec_path.is_file():
        raise MissingFileError(f"{spec_path} not found; is {str(run)!r} a jaxinterp run directory?")
    cfg = load_config(run / "config.yaml")
    trainer = trainer_from_run(cfg, json.loads(spec_path.read_text()))
    spec = trainer.spec
    dummy = [np.zeros((1, trainer.batch_width), np.float32)]
    abstract = jax.eval_shape(lambda: trainer.init_state(dummy))
    ckpt = Checkpointer(run / "checkpoints", keep=cfg.output.keep_checkpoints)
    target = abstract_like(abstract, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                                                  abstract))
    state, _ = ckpt.restore(target, step)
    ckpt.close()
    return spec, state.dictionary


def checkpoint_artifact(run_dir: str | Path, step: int | None = None):
    """The dictionary of a run's latest (or given) training checkpoint, as `load_dictionary` returns a
    finished run's: sites and model from the run's config (a run stopped before its end, or an
    earlier step of a finished one)."""
    from jaxinterp.dictionaries.artifact import CLTDictionary
    from jaxinterp.dictionaries.clt import CLTSpec

    spec, params = checkpoint_dictionary(run_dir, step)
    cfg = load_config(Path(run_dir) / "config.yaml")
    params = {k: np.asarray(jax.device_get(v)) for k, v in params.items()}
    taken = int(step) if step is not None else _latest_step(Path(run_dir) / "checkpoints")
    meta = {"data_source": cfg.data.source, "step": taken, "trained_with": "jaxinterp", "from_checkpoint": True}
    model = cfg.data.model if cfg.data.source == "model" else None
    if isinstance(spec, CLTSpec):
        return CLTDictionary(spec=spec, params=params, model=model, metadata=meta)
    return dl.Dictionary(spec, params, site=cfg.data.site, target_site=cfg.data.target_site, model=model, metadata=meta)


def _latest_step(ckpt_dir: Path) -> int | None:
    steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []
    return max(steps) if steps else None


def _check_batch(cfg: Config, mesh) -> None:
    n_data = mesh.shape["data"]
    if cfg.train.batch_size % n_data:
        raise TrainingError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by mesh.data={n_data}; "
            "pick a multiple of the data-parallel size"
        )


class _Clock:
    """Wall seconds per phase of a run, reported with the final evaluation."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t


def _where(cfg: Config, source, batch_index: int) -> Callable[[int], str]:
    """Names row `r` of the source's batch `batch_index` in an error message."""
    if hasattr(source, "describe"):
        return lambda r: source.describe(batch_index, r)
    return lambda r: f"data.source {cfg.data.source} ({cfg.data.model} at {cfg.data.site}), batch {batch_index}, row {r}"


def _stream_index(source, default: int) -> int:
    stream = getattr(source, "stream", None)
    return stream.next_index if stream is not None else default


class _NoMetrics:
    """The metrics writer of a process other than the first: it writes nothing."""

    def write(self, record: dict) -> None:
        del record

    def close(self) -> None:
        pass


def _data_states(source) -> dict:
    """The data position of every process, in process order, to save with a checkpoint."""
    return {"processes": distributed.allgather_json(source.get_state())}


def _restore_data_state(source, saved: dict) -> None:
    """Set this process's data position from a checkpoint's (written by any number of processes:
    positions are global, so a checkpoint whose processes agree resumes on any number)."""
    states = saved.get("processes", [saved])  # checkpoints before multi-process runs hold one state
    me, n = distributed.process_index(), distributed.process_count()
    if len(states) == n:
        mine = states[me]
    elif all(st == states[0] for st in states):
        mine = states[0]
    else:
        raise TrainingError(f"the checkpoint holds the data positions of {len(states)} processes, and they differ; "
                            f"resume on {len(states)} processes")
    source.set_state(mine)


def train(cfg: Config, *, resume: bool = False, log=print, max_traces: int | None = None) -> dict:
    """Train a dictionary as configured; returns the final evaluation (also the last line of
    `<output.dir>/metrics.jsonl`), with the seconds spent in each phase of the run.

    In a multi-process run (`jaxinterp.distributed`) every process calls this: each reads its rows
    of every batch, all take part in the steps, checkpoints and the final evaluation, and process 0
    alone writes the run's files, logs and shows progress."""
    clock = _Clock()
    primary = distributed.is_primary()
    if not primary:
        log = lambda s: None  # noqa: E731
    run = Path(cfg.output.dir)
    ckpt_dir = run / "checkpoints"
    with clock("setup"):
        source = make_source(cfg)
        trainer = make_trainer(cfg, source)
        mesh = sharding.make_mesh(cfg.mesh)
    _check_batch(cfg, mesh)
    batch_shape = (cfg.train.batch_size, trainer.batch_width)
    lo, hi = distributed.local_rows(sharding.batch_sharding(mesh, cfg.train.batch_size), batch_shape)
    source.set_share(RowShare.of(mesh.shape["data"], lo, hi, cfg.train.batch_size))
    trainer.preflight(mesh, log)

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
    if primary:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        (run / "dictionary.json").write_text(json.dumps(trainer.spec_json(), indent=2) + "\n")
    ckpt = existing or Checkpointer(ckpt_dir, keep=cfg.output.keep_checkpoints)

    with clock("init"):
        if latest is not None:
            dummy = [np.zeros((1, trainer.batch_width), np.float32)]
            abstract = jax.eval_shape(lambda: trainer.init_state(dummy))
            fns = trainer.build_step(mesh, abstract, max_traces=max_traces)
            state, data_state = ckpt.restore(abstract_like(abstract, fns.state_sharding), latest)
            _restore_data_state(source, data_state)
            log(f"resumed from step {latest} of {cfg.train.steps}")
        else:
            init_batches = []
            for i in range(cfg.train.init_batches):
                index = _stream_index(source, i)
                batch = np.asarray(next(source), np.float32)
                where = _where(cfg, source, index)
                check_finite(batch, lambda r, where=where: where(r + lo))
                if distributed.process_count() > 1:  # every process initialises from the whole batch
                    batch = distributed.host_array(distributed.global_batch(batch, sharding.batch_sharding(
                        mesh, cfg.train.batch_size), batch_shape))
                init_batches.append(batch)
            state = trainer.init_state(init_batches)
            fns = trainer.build_step(mesh, state, max_traces=max_traces)
            state = place_state(state, fns)

    total = cfg.train.steps
    start = int(state.step)
    first_batch = _stream_index(source, start)
    lr = resolved_lr(cfg.train, trainer.d_sae)
    writer = MetricsWriter(run, truncate_after_step=start if latest is not None else None) if primary else _NoMetrics()
    resample = trainer.resampler(fns)
    log(f"training {trainer.describe()} for {total} steps "
        f"({cfg.train.tokens:,} tokens) on {sharding.describe(mesh)}, {cfg.train.optimizer} lr {lr:.3g} "
        f"({cfg.train.lr_schedule})")

    def stop_if_faulty(fault, metrics: dict) -> None:
        f = read_fault(fault)
        if f is None:
            return
        last = ckpt.latest_step()
        where = str(ckpt_dir / str(last)) if last is not None else "none written yet"
        ckpt.close()
        writer.close()
        raise TrainingError(fault_message(f, where=_where(cfg, source, first_batch + f.step - start), lr=lr,
                                          grad_clip=cfg.train.grad_clip, metrics=metrics, checkpoint=where))

    # A bar only on a terminal (disable=None): piped stderr stays free for errors.
    bar = tqdm(total=total, initial=start, disable=None if cfg.output.progress and primary else True, unit="step",
               dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start
    metrics = None
    in_flight: collections.deque = collections.deque()
    loop_start, loop_steps, loop_compile = None, 0, 0.0
    # The step with aux-k runs while some feature is dead, as read from the metrics of the step two
    # behind (already waited for, so the choice costs no extra synchronisation).
    aux_on = fns.step_aux_k is not None and bool(distributed.host_array(
        jax.numpy.any(state.tokens_since_fired >= cfg.dictionary.dead_tokens)))
    aux_compiled = False
    for step in range(start, total):
        if metrics is not None and not source.host_side:
            # A source that runs its own XLA program (the live model) waits for the step in flight:
            # on a multi-device CPU, a second program competing for the same thread pool can starve
            # the step's all-reduce. Host-side sources are read ahead by their own thread.
            jax.block_until_ready(metrics)
        first_aux = aux_on and not aux_compiled
        compiling = step == start or first_aux
        with clock("compile") if compiling else contextlib.nullcontext():
            t_compile = time.perf_counter()
            x = distributed.global_batch(next(source), fns.batch_sharding, batch_shape)
            state, metrics = (fns.step_aux_k if aux_on else fns.step)(state, x)
            if compiling:
                jax.block_until_ready(metrics)  # the compiles and their first steps, timed on their own
                if step != start:
                    loop_compile += time.perf_counter() - t_compile
        aux_compiled = aux_compiled or aux_on
        in_flight.append(metrics)
        if len(in_flight) > 2:
            # Dispatch runs at most two steps ahead: the device never waits, and host memory does
            # not fill with queued batches.
            behind = in_flight.popleft()
            if fns.step_aux_k is not None:
                aux_on = float(behind["dead_fraction"]) > 0
            else:
                jax.block_until_ready(behind)
        if step == start:
            loop_start = time.perf_counter()
        elif not first_aux:
            loop_steps += 1
        done = step + 1
        if resample is not None and done % cfg.train.resample_every == 0:
            state = resample(state, x, jax.random.fold_in(jax.random.key(cfg.train.seed), done))
        if done % cfg.output.log_every == 0 or done == total:
            m, fault = distributed.host_tree((metrics, state.fault))
            m = {k: float(v) for k, v in m.items()}
            stop_if_faulty(fault, m)
            now = time.perf_counter()
            m["tokens_per_s"] = (done - step_last) * cfg.train.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            writer.write({"step": done, "tokens": done * cfg.train.batch_size, **m})
            bar.set_postfix(tok_s=f"{m['tokens_per_s']:.0f}", loss=f"{m['loss']:.4g}", l0=f"{m['l0']:.1f}",
                            dead=f"{m['dead_fraction']:.3f}", refresh=False)
        if done % cfg.output.checkpoint_every == 0 and done != total:
            stop_if_faulty(state.fault, {})  # never checkpoint a state past a fault
            with clock("checkpoint"):
                ckpt.save(done, state, _data_states(source))
        bar.update(1)
    bar.close()
    jax.block_until_ready(state)
    loop_seconds = time.perf_counter() - loop_start - loop_compile if loop_start is not None else 0.0
    # The loop's phase: its wall time after the first step, less compiles and mid-run checkpoints
    # (their own phases), so that the phases add up to the run.
    clock.seconds["loop"] = max(loop_seconds - clock.seconds.get("checkpoint", 0.0), 0.0)
    with clock("checkpoint"):
        if ckpt.latest_step() != total:
            ckpt.save(total, state, _data_states(source), force=True)
        ckpt.wait()

    state = distributed.host_tree(state)  # every process holds the whole dictionary from here on
    with clock("eval"):
        final = final_evaluation(cfg, trainer, state, source)
    if primary:
        with clock("export"):
            trainer.export(run, state, source, log)
    final["lr"] = lr
    final["loop_tokens_per_s"] = loop_steps * cfg.train.batch_size / loop_seconds if loop_steps else None
    final["seconds"] = {k: round(v, 3) for k, v in clock.seconds.items()}
    writer.write(final)
    writer.close()
    ckpt.close()
    return final


def run_dictionary(cfg: Config, spec: dl.DictionarySpec, params: dl.Params, source) -> dl.Dictionary:
    """The artifact of a run: its dictionary with the sites and model its data came from."""
    model = cfg.data.model if cfg.data.source == "model" else getattr(source, "model_name", None)
    return dl.Dictionary(spec, params, site=source_site(cfg, source), target_site=getattr(source, "target_site", None),
                         model=model, metadata={"data_source": cfg.data.source, "step": int(cfg.train.steps),
                                                "trained_with": "jaxinterp"})


def source_site(cfg: Config, source) -> str | None:
    """The site the activations come from: the source's own (a cache records it), else `data.site`."""
    return getattr(source, "site", None) or cfg.data.site


def final_evaluation(cfg: Config, trainer, state: TrainState, source) -> dict:
    result = trainer.final_evaluation(state, source)
    dead = np.asarray(jax.device_get(state.tokens_since_fired)) >= cfg.dictionary.dead_tokens
    return {
        "final": True,
        "step": int(state.step),
        "tokens": int(state.step) * cfg.train.batch_size,
        "dead_fraction": float(np.mean(dead)),
        **result,
    }


def summary_line(final: dict) -> str:
    keys = ["ce_loss_score", "kl_div_score", "agreement", "kl", "explained_variance", "fvu", "mse", "cossim", "l2_ratio",
            "l0", "frac_alive", "dead_fraction", "mmcs"]
    return "final: " + "  ".join(f"{k}={final[k]:.4g}" for k in keys if k in final)
