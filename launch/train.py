"""Train a sparse dictionary: `python launch/train.py --config configs/toy.yaml [--set k=v ...] [--resume]`.

On several processes (a TPU pod slice, a GPU cluster, or processes on one machine) run the same
command on every process with `--distributed auto` (where JAX detects the cluster) or
`--coordinator HOST:PORT --num-processes N --process-id I`; see the README's pod section."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp import distributed  # noqa: E402
from jaxinterp.cli import configure_host_devices, run_main  # noqa: E402

configure_host_devices()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-3")
    ap.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    ap.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    ap.add_argument("--estimate", action="store_true",
                    help="CLTs: print the parameter count and bytes per device on the configured mesh (mesh.data and "
                         "mesh.model as numbers; they need not exist on this machine), then exit")
    distributed.add_arguments(ap)
    args = ap.parse_args()
    distributed.initialize(distributed.requested(args))  # before any other JAX call

    from jaxinterp.config import load_config
    from jaxinterp.train import summary_line, train

    cfg = load_config(args.config, args.set)
    if args.estimate:
        return _estimate(cfg)
    # stderr carries only a failure's one line; progress lines go to stdout unless it holds JSON.
    final = train(cfg, resume=args.resume, log=(lambda s: None) if args.json else (lambda s: print(s, flush=True)))
    if not distributed.is_primary():
        return 0
    if args.json:
        print(json.dumps(final))
    else:
        print(summary_line(final))
        print(f"run directory: {cfg.output.dir} (metrics.jsonl, checkpoints/, dictionary/, export/)")
    return 0


def _estimate(cfg) -> int:
    from jaxinterp.config import ConfigError
    from jaxinterp.data.activations import clt_sites
    from jaxinterp.models import load_model
    from jaxinterp.train import clt_step

    if cfg.dictionary.architecture != "clt":
        raise ConfigError("--estimate: sizes CLTs (dictionary.architecture: clt); an SAE's weights are 2 d_in d_sae")
    if cfg.mesh.data < 1 or cfg.mesh.model < 1:
        raise ConfigError("--estimate: give the mesh as numbers, e.g. --set mesh.data=4 --set mesh.model=8")
    model, _ = load_model(cfg.data.model)
    sites = clt_sites(cfg.dictionary.clt, model.cfg.n_layers)
    spec = clt_step.make_spec(cfg, len(sites) // 2, model.cfg.d_model)
    est = clt_step.memory_estimate(cfg, spec, data=cfg.mesh.data, model=cfg.mesh.model)
    print(clt_step.describe_memory(spec, est, cfg.mesh.data, cfg.mesh.model))
    return 0


if __name__ == "__main__":
    run_main(main)
