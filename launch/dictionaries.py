"""The local index of pretrained dictionaries (names for folders on this machine):

    python launch/dictionaries.py add NAME PATH [--site SITE] [--model MODEL]
    python launch/dictionaries.py list [--json]
    python launch/dictionaries.py remove NAME

The index is `$JAXINTERP_DICTIONARIES` or `~/.jaxinterp/dictionaries.yaml` (`--index FILE` for
another). `add` reads the folder once (any format `jaxinterp.load_dictionary` reads) and records its
format, kind, model and sites; afterwards NAME works wherever a dictionary path does
(`launch/generate.py --dictionary NAME`, `launch/dashboard.py --dictionary NAME`, ...). Nothing is
downloaded: fetch releases with the hub's own tools first (README, "Pretrained dictionaries").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinterp.cli import run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", help="the index file (default $JAXINTERP_DICTIONARIES or ~/.jaxinterp/dictionaries.yaml)")
    sub = ap.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="register a dictionary folder under a name")
    add.add_argument("name")
    add.add_argument("path")
    add.add_argument("--site", help="the site it reads, where the folder does not say (e.g. blocks.20.resid_post)")
    add.add_argument("--model", help="the model it was trained on, where the folder does not say")
    ls = sub.add_parser("list", help="print the index")
    ls.add_argument("--json", action="store_true")
    rm = sub.add_parser("remove", help="forget a name (the folder stays)")
    rm.add_argument("name")
    args = ap.parse_args()
    if args.index:
        os.environ["JAXINTERP_DICTIONARIES"] = args.index
    from jaxinterp.interop.index import DictionaryIndex

    index = DictionaryIndex()
    if args.command == "add":
        entry = index.add(args.name, args.path, site=args.site, model=args.model)
        print(f"{args.name}: {entry['format']} {entry['kind']} (d_sae {entry['d_sae']}) at {entry['site']} of "
              f"{entry['model']} -> {index.path}")
    elif args.command == "remove":
        index.remove(args.name)
        print(f"removed {args.name} from {index.path}")
    else:
        entries = index.entries()
        if args.json:
            print(json.dumps(entries))
        for name, e in sorted(entries.items()) if not args.json else ():
            print(f"{name}\t{e.get('format')}\t{e.get('kind')}\t{e.get('site')}\t{e.get('model')}\t{e['path']}")
    return 0


if __name__ == "__main__":
    run_main(main)
