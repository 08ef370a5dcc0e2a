"""Convert a dictionary between formats:

    python launch/convert.py SRC OUT --to saelens|sparsify|circuit-tracer|jaxinterp [--step N]
    python launch/convert.py LAYER0 LAYER1 ... OUT --to circuit-tracer     # a per-layer transcoder set

SRC is any folder `jaxinterp.load_dictionary` reads (a jaxinterp dictionary or run directory,
SAELens, sparsify, Gemma Scope 1/2, Llama Scope, circuit-tracer) or a run directory's training
checkpoint (its latest; `--step N` for another; a run that has not finished has only those). The
output is read back and its reconstruction of random inputs compared with the source's; the line
printed gives the largest relative difference. A kind the target format cannot hold is refused with
a line naming the kind and the formats that take it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="SRC ... OUT", help="source folder(s), then the output folder")
    ap.add_argument("--to", required=True, choices=("saelens", "sparsify", "circuit-tracer", "jaxinterp"))
    ap.add_argument("--step", type=int, help="convert this training checkpoint of a run directory")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if len(args.paths) < 2:
        ap.error("give a source and an output folder")
    from jaxinterp.dictionaries.artifact import CLTDictionary, load_dictionary
    from jaxinterp.interop.convert import max_difference, read_source, write
    from jaxinterp.interop.formats import detect

    *sources, out = args.paths
    dictionaries = [read_source(s, step=args.step) for s in sources]
    written = write(dictionaries if len(dictionaries) > 1 else dictionaries[0], out, args.to)
    back = load_dictionary(written)
    if isinstance(back, CLTDictionary) and not isinstance(dictionaries[0], CLTDictionary):
        diff = 0.0  # a transcoder set reads back as one CLT of span 1: compare layer by layer
        from jaxinterp.interop.circuit_tracer import load_transcoder_set

        diff = max(max_difference(a, b) for a, b in zip(dictionaries, load_transcoder_set(written)))
    else:
        diff = max_difference(dictionaries[0], back)
    first = dictionaries[0]
    kind = "clt" if isinstance(first, CLTDictionary) else f"{first.spec.activation} {first.spec.architecture}"
    result = {"written": str(written), "format": detect(written), "kind": kind, "sources": len(sources),
              "max_relative_difference": diff}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {written} ({result['format']}, {kind}); read back, reconstructions differ by at most "
              f"{diff:.2e} of the largest output")
    return 0


if __name__ == "__main__":
    run_main(main)
