"""A local index of pretrained dictionaries: names for folders the user has on disk.

The index is a YAML (or JSON) file the user keeps, `$JAXINTERP_DICTIONARIES` or
`~/.jaxinterp/dictionaries.yaml`:

    gemma-scope-2b-res-20-16k:
      path: /data/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71
      format: gemma-scope
      model: google/gemma-2-2b
      site: blocks.20.resid_post

Every place that takes a dictionary path takes a name from it as well (`load_dictionary`, so
`launch/generate.py --dictionary NAME`, `launch/dashboard.py --dictionary NAME`, steering's
`DictionaryRegistry().add(NAME)`). Nothing is downloaded: fetch a release on a connected machine
with the hub's own tools and `add` the folder (README, "Pretrained dictionaries").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from jaxinterp.errors import JaxinterpError

ENV = "JAXINTERP_DICTIONARIES"
FIELDS = ("path", "format", "model", "site", "target_site", "kind", "d_sae")


class DictionaryIndexError(JaxinterpError):
    """An index file that cannot be read, or a name it does not hold."""


def default_path() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".jaxinterp" / "dictionaries.yaml")


class DictionaryIndex:
    """Names -> dictionary folders (with their format, model and sites), kept in one file."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()

    def entries(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as e:
            raise DictionaryIndexError(f"{self.path} is not readable YAML/JSON ({str(e).splitlines()[0]}); fix or remove it") from None
        if not isinstance(data, dict) or not all(isinstance(v, dict) and "path" in v for v in data.values()):
            raise DictionaryIndexError(f"{self.path}: expected a mapping name -> {{path, format, model, site}}")
        return data

    def names(self) -> list[str]:
        return sorted(self.entries())

    def get(self, name: str) -> dict:
        entries = self.entries()
        if name not in entries:
            have = ", ".join(sorted(entries)[:10]) or "none"
            raise DictionaryIndexError(f"no dictionary named {name!r} in {self.path} (names: {have}); add it with "
                              "python launch/dictionaries.py add NAME PATH")
        return entries[name]

    def add(self, name: str, path: str | Path, *, site: str | None = None, model: str | None = None) -> dict:
        """Register the folder at `path` as `name` (format, kind, model and sites read from it;
        `site` / `model` override what the folder says or fill what it does not); returns the entry."""
        from jaxinterp.dictionaries.artifact import CLTDictionary
        from jaxinterp.interop import formats

        if not name or "/" in name or os.sep in name:
            raise DictionaryIndexError(f"name {name!r}: use a name without slashes (paths are given separately)")
        folder = Path(path).expanduser().absolute()
        fmt = formats.detect(folder)
        d = formats.load(folder)  # reads it once: a folder that does not load is not registered
        entry = {"path": str(folder), "format": fmt, "model": model or d.model}
        if isinstance(d, CLTDictionary):
            entry |= {"kind": "clt", "d_sae": d.d_sae, "site": None, "target_site": None}
        else:
            entry |= {"kind": f"{d.spec.activation} {d.spec.architecture}", "d_sae": d.d_sae,
                      "site": site or d.site, "target_site": d.target_site}
        entries = self.entries()
        entries[name] = entry
        self._write(entries)
        return entry

    def remove(self, name: str) -> None:
        entries = self.entries()
        self.get(name)
        del entries[name]
        self._write(entries)

    def _write(self, entries: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        text = json.dumps(entries, indent=2) + "\n" if self.path.suffix == ".json" else yaml.safe_dump(entries, sort_keys=True)
        tmp.write_text(text)
        tmp.replace(self.path)  # a crash leaves the old index whole


def resolve(name_or_path: str | Path) -> tuple[Path, dict | None]:
    """(folder, index entry or None): an existing path as it is, else a name of the index."""
    p = Path(name_or_path)
    if p.exists() or isinstance(name_or_path, Path) or "/" in str(name_or_path):
        return p, None
    index = DictionaryIndex()
    entries = index.entries()
    if str(name_or_path) in entries:
        entry = entries[str(name_or_path)]
        return Path(entry["path"]), entry
    return p, None
