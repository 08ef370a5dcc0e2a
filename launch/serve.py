"""Serve a model over HTTP with dictionaries attached: OpenAI-compatible completions and chat
completions with per-request steering and feature reads, side-by-side steering, drift metrics.

    python launch/serve.py --model smollm2-135m --dictionary runs/default --port 8000
        [--dictionary NAME=PATH ...] [--slots 8] [--max-len 512] [--max-queue 64]
        [--monitor] [--host 127.0.0.1]

`--dictionary` takes a run or dictionary directory, any folder `jaxinterp.load_dictionary` reads,
or a name of the dictionary index (`launch/dictionaries.py`); each is attached at its own site,
which becomes steerable and readable (`return_features`). `--monitor` folds every request's
features at those sites into drift statistics (`/metrics`). Endpoints: README, "Serving".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a registry name, a .gguf file or an HF checkpoint directory")
    ap.add_argument("--dictionary", action="append", default=[], help="[NAME=]PATH or an index name")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--slots", type=int, default=8, help="requests decoded at once")
    ap.add_argument("--max-len", type=int, default=512, help="cache slots per request: prompt bucket + new tokens")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting before new ones get 429")
    ap.add_argument("--feature-slots", type=int, default=4, help="feature edits per request and site")
    ap.add_argument("--vector-slots", type=int, default=2, help="vector edits per request and site")
    ap.add_argument("--monitor", action="store_true", help="drift statistics at every dictionary's site")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens when a request gives none")
    ap.add_argument("--no-warm-up", action="store_true", help="compile on first use instead of at start")
    args = ap.parse_args()

    import uvicorn

    from jaxinterp.dictionaries.artifact import load_site_dictionary
    from jaxinterp.models import load_model
    from jaxinterp.serving.engine import EngineConfig
    from jaxinterp.serving.server import Service, make_app

    model, tokenizer = load_model(args.model)
    attached = {}
    for item in args.dictionary:
        name, sep, path = item.partition("=")
        path = path if sep else name
        d = load_site_dictionary(path, use="serving")
        d.check_model(model.cfg.d_model, model.cfg.n_layers, model=args.model)
        attached[name] = (path, d)
    sites = tuple(dict.fromkeys(d.site for _, d in attached.values()))
    config = EngineConfig(slots=args.slots, max_len=args.max_len, feature_slots=args.feature_slots,
                          vector_slots=args.vector_slots, monitor_sites=sites if args.monitor else ())
    service = Service(model, tokenizer, model_name=args.model, config=config, dictionaries=attached,
                      max_queue=args.max_queue, default_max_tokens=args.max_tokens, warm_up=not args.no_warm_up)
    print(f"serving {args.model} with {len(attached)} dictionaries ({', '.join(sites) or 'none'}) on "
          f"http://{args.host}:{args.port}", flush=True)
    uvicorn.run(make_app(service), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    run_main(main)
