"""A dictionary's dashboard from a corpus: the pass (resumable), reports, the site and the exports.

    out/index.html, out/f/{id}.html, out/static/     the site (see `site.py`)
    out/pass/stats.npz, out/pass/entries-*.npz        the pass so far: a killed run resumes from it
    out/summary.json                                  settings and timings of the run

The pass is saved every `save_every` contexts: the statistics whole (their meta holds the next
context and the settings, so a resume with other settings starts over), the firing entries as one
file per stretch of contexts. A resumed run gives the same site as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxinterp.errors import UsageError
from jaxinterp.features.corpus import CorpusPass, Entries, corpus_pass
from jaxinterp.features.stats import load_stats, save_stats


@dataclasses.dataclass(frozen=True)
class DashboardSettings:
    corpus: str = "shakespeare"
    """`shakespeare`, a folder of .txt files or a .jsonl with a `text` field."""
    tokens: int = 100_000
    """Corpus tokens to read (rounded up to whole contexts)."""
    context_length: int = 128
    """Tokens per context, BOS first."""
    seed: int = 0
    """Which contexts of the corpus are read (a seeded sample of them)."""
    k: int = 20
    """Top contexts kept per feature."""
    samples: int = 40
    """Random firing tokens kept per feature, split into quantile bands."""
    n_quantiles: int = 4
    batch_contexts: int = 16
    max_active: int = 64
    """Firing features per token the sparse path makes room for (on average over a batch)."""
    left: int = 12
    """Tokens shown before an example's token."""
    right: int = 4
    """Tokens shown after it."""
    n_logits: int = 10
    cofiring: bool = True
    """Correlated features per feature (dictionaries up to `cofiring.MAX_FEATURES` features)."""
    save_every: int = 128
    """Contexts between saves of the pass."""


def parse_features(spec: str, d_sae: int) -> list[int]:
    """`all`, or ids and ranges such as `0-99,512,1000-1010` (ranges inclusive)."""
    if spec == "all":
        return list(range(d_sae))
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise UsageError(f"--features {spec!r}: {part!r} is not an id or a range; write e.g. 0-99,512")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo or hi >= d_sae:
            raise UsageError(f"--features {spec!r}: {part!r} is outside [0, {d_sae - 1}] or reversed")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def corpus_contexts(corpus: str, tokenizer, tokens: int, context_length: int, seed: int) -> np.ndarray:
    """[N, T] contexts holding at least `tokens` tokens past BOS, a seeded sample of the corpus's."""
    from jaxinterp.data.corpus import corpus_documents, token_contexts

    every = token_contexts(corpus_documents(corpus), tokenizer, context_length)
    n = math.ceil(tokens / (context_length - 1))
    if n > len(every):
        raise UsageError(f"--tokens {tokens}: the corpus {corpus!r} holds {len(every) * (context_length - 1):,} "
                         f"tokens in contexts of {context_length}; ask for fewer")
    pick = np.random.default_rng(seed).permutation(len(every))[:n]
    return every[np.sort(pick)]


def _fingerprint(settings: DashboardSettings, dictionary_path: str) -> dict:
    keep = ("corpus", "tokens", "context_length", "seed", "k", "samples", "batch_contexts", "max_active")
    return {"dictionary": str(Path(dictionary_path).absolute()), **{k: getattr(settings, k) for k in keep}}


def _resume(pass_dir: Path, fingerprint: dict) -> tuple[CorpusPass | None, int]:
    path = pass_dir / "stats.npz"
    if not path.is_file():
        return None, 0
    stats, meta = load_stats(path)
    if meta.get("settings") != fingerprint:
        return None, 0
    done = meta["next_context"]
    files = sorted(pass_dir.glob("entries-*.npz"))
    parts = []
    for f in files:
        start, end = (int(x) for x in f.stem.split("-")[1:])
        if end <= done:
            with np.load(f) as z:
                parts.append(Entries(z["locs"], z["feats"], z["vals"]))
        else:
            f.unlink()  # written after the last save of the statistics
    return CorpusPass(stats, Entries.concat(parts)), done


def run_pass(model, dictionary, contexts_nt: np.ndarray, settings: DashboardSettings, pass_dir: Path,
             fingerprint: dict, log: Callable[[str], None] = print) -> CorpusPass:
    """The corpus pass with every firing entry, saved as it goes and resumed from `pass_dir`."""
    pass_dir.mkdir(parents=True, exist_ok=True)
    state, start = _resume(pass_dir, fingerprint)
    if start:
        log(f"resuming the corpus pass at context {start} of {len(contexts_nt)}")
    pending: list[Entries] = []
    last = [start]

    def on_batch(done: int, batch: CorpusPass) -> None:
        pending.append(batch.entries)
        if done - last[0] >= settings.save_every or done == len(contexts_nt):
            part = Entries.concat(pending)
            tmp = pass_dir / f"partial-entries-{last[0]:08d}-{done:08d}.npz"
            np.savez(tmp, locs=part.locs, feats=part.feats, vals=part.vals)
            tmp.replace(pass_dir / f"entries-{last[0]:08d}-{done:08d}.npz")
            save_stats(pass_dir / "stats.npz", batch.stats, next_context=done, settings=fingerprint)
            pending.clear()
            last[0] = done
            log(f"  {done} of {len(contexts_nt)} contexts")

    return corpus_pass(model, dictionary, contexts_nt, k=settings.k, samples=settings.samples,
                       batch_contexts=settings.batch_contexts, keep_entries=True, max_active=settings.max_active,
                       state=state, start=start, on_batch=on_batch)


def build_dashboard(dictionary_path: str, out_dir, settings: DashboardSettings = DashboardSettings(), *,
                    features: str = "all", model_name: str | None = None, neuronpedia: str | None = None,
                    delphi: str | None = None, delphi_splits: int = 8, log: Callable[[str], None] = print) -> dict:
    """Read the corpus through the dictionary at `dictionary_path` (a run or dictionary directory),
    write the site into `out_dir`, and the Neuronpedia batches and delphi cache when asked. Returns
    the run's summary (also written to summary.json)."""
    from jaxinterp.dictionaries import load_site_dictionary
    from jaxinterp.features.cofiring import MAX_FEATURES, correlated_features
    from jaxinterp.features.examples import build_reports, token_strings
    from jaxinterp.features.logits import logit_effects
    from jaxinterp.features.site import write_site
    from jaxinterp.models import load_model

    t0 = time.perf_counter()
    out = Path(out_dir)
    dictionary = load_site_dictionary(dictionary_path, use="the dashboard")
    name = model_name or dictionary.model or "smollm2-135m"
    model, tok = load_model(name)
    if tok is None:
        raise UsageError(f"model {name!r} has no tokenizer; a dashboard shows text: give a model with tokenizer.json")
    dictionary.check_model(model.cfg.d_model, model.cfg.n_layers)
    ids = parse_features(features, dictionary.d_sae)
    contexts = corpus_contexts(settings.corpus, tok, settings.tokens, settings.context_length, settings.seed)
    log(f"reading {contexts.shape[0]} contexts of {contexts.shape[1]} tokens ({contexts.shape[0] * (contexts.shape[1] - 1):,} "
        f"tokens) of {settings.corpus} through {dictionary.site} ({dictionary.spec.activation}, d_sae {dictionary.d_sae})")
    t_pass = time.perf_counter()
    done = run_pass(model, dictionary, contexts, settings, out / "pass", _fingerprint(settings, dictionary_path), log)
    t_reports = time.perf_counter()
    logits = logit_effects(model, dictionary, k=settings.n_logits)
    strings = token_strings(tok, model.cfg.vocab_size)
    correlated = None
    if settings.cofiring and dictionary.d_sae <= MAX_FEATURES:
        correlated = correlated_features(done.entries, dictionary.d_sae, int(done.stats.n_rows))
    elif settings.cofiring:
        log(f"no co-firing table: d_sae {dictionary.d_sae} is above {MAX_FEATURES}")
    reports = build_reports(done.stats, done.entries, contexts, strings, ids, logits=logits, left=settings.left,
                            right=settings.right, n_quantiles=settings.n_quantiles, correlated=correlated)
    t_site = time.perf_counter()
    subtitle = (f"{dictionary.spec.activation} dictionary at {dictionary.site} of {name}, d_sae {dictionary.d_sae}; "
                f"{int(done.stats.n_rows):,} tokens of {settings.corpus}")
    index = write_site(out, reports, dictionary=str(dictionary_path), site=dictionary.site,
                       title=f"{Path(dictionary_path).name}: features", subtitle=subtitle)
    written = {"site": str(index)}
    if neuronpedia:
        from jaxinterp.features.neuronpedia import write_neuronpedia

        layer = re.match(r"blocks\.(\d+)\.", dictionary.site or "")
        paths = write_neuronpedia(neuronpedia, reports, model_id=name, layer=int(layer.group(1)) if layer else 0,
                                  sae_set=f"jaxinterp-{dictionary.spec.activation}-{dictionary.d_sae}",
                                  n_features=dictionary.d_sae, dataset=settings.corpus,
                                  n_prompts_total=int(contexts.shape[0]), n_tokens_in_prompt=int(contexts.shape[1]))
        written["neuronpedia"] = [str(p) for p in paths]
    if delphi:
        from jaxinterp.features.delphi_cache import write_delphi_cache

        c, p = np.divmod(done.entries.locs.astype(np.int64), contexts.shape[1])
        rows = np.stack([c, p, done.entries.feats.astype(np.int64)], 1)
        from jaxinterp.models.registry import HUB_NAMES

        paths = write_delphi_cache(delphi, dictionary.site or "site", rows, done.entries.vals, contexts,
                                   dictionary.d_sae, delphi_splits, model_name=HUB_NAMES.get(name, name))
        written["delphi"] = [str(p) for p in paths]
    t_end = time.perf_counter()
    summary = {"dictionary": str(Path(dictionary_path).absolute()), "model": name, "site": dictionary.site, "d_sae": dictionary.d_sae,
               "features": len(ids), "tokens": int(done.stats.n_rows), "entries": int(len(done.entries.locs)),
               "settings": dataclasses.asdict(settings), "seconds": {
                   "load": t_pass - t0, "pass": t_reports - t_pass, "reports": t_site - t_reports,
                   "write": t_end - t_site, "total": t_end - t0},
               "written": written}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def describe(summary: dict) -> list[str]:
    s = summary["seconds"]
    return [f"{summary['features']} feature pages from {summary['tokens']:,} tokens in {s['total']:.0f} s "
            f"(pass {s['pass']:.0f} s, reports {s['reports']:.0f} s, writing {s['write']:.0f} s): "
            f"{summary['written']['site']}"]
