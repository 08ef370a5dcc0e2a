"""FeatureReports as the `batch-{n}.json` files that Neuronpedia imports for one source (SAE).

The format is the one SAEDashboard's `NeuronpediaRunner` writes and Neuronpedia's converter
(`convert-saedashboard-to-neuronpedia-export.py`, or SAEDashboard's `neuronpedia_export.py`) reads:

    {"model_id": str, "layer": int | str, "sae_set": str, "sae_id_suffix": str | None,
     "features": [feature, ...]}

Neuronpedia names the source `f"{layer}-{sae_set}"` (plus `__{sae_id_suffix}` when set). Each
feature carries the keys of `NEURONPEDIA_FEATURE_FIELDS`; each entry of its `activations` is

    {"bin_min", "bin_max", "bin_contains", "tokens": [str], "values": [float],
     "qualifying_token_index": int}

and the converter derives `maxValue`, `maxValueTokenIndex` and `minValue` from `values` itself.
Mapping from a `FeatureReport`:

- `top` examples form the "top activations" group: bin_min = -1, bin_contains = -1 and bin_max =
  the feature's max, as SAEDashboard marks that group;
- each `QuantileBin` gives its lo/hi as bin_min/bin_max, and bin_contains = its share of all the
  quantile examples (the bands are equal-count bands of a uniform sample of firing tokens, so this
  estimates the fraction of firing tokens in the band);
- `qualifying_token_index` is the example's `focus`;
- the activation histogram lies on log10 edges, so `freq_hist_data_bar_values` are the geometric
  centers 10 ** ((e[i] + e[i+1]) / 2) in activation units; empty bins at either end are dropped,
  so the heights still sum to `count`. Logit histogram values are the arithmetic bin centers;
- `correlated_features_indices` / `_pearson` are the report's correlated features (Pearson over
  every token); the neuron alignment tables, `correlated_features_l1`, `decoder_weights_dist`,
  `dataset` and the prompt counts are written empty (or as given), as SAEDashboard does when it does
  not compute them.

A feature that never fired is written like the others, with no activations and an empty activation
histogram. Floats keep 6 significant digits. `skipped_indexes.json` beside the batches names the
features of the dictionary without a report; Neuronpedia creates them as empty ("dead") features.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from jaxinterp.errors import UsageError
from jaxinterp.features.report import FeatureReport

_INT, _NUM, _STR, _INTS, _NUMS, _STRS, _LIST = "int", "number", "str", "ints", "numbers", "strs", "list"
_FEATURE_SCHEMA = {
    "feature_index": _INT,
    "neuron_alignment_indices": _INTS, "neuron_alignment_values": _NUMS, "neuron_alignment_l1": _NUMS,
    "correlated_neurons_indices": _INTS, "correlated_neurons_l1": _NUMS, "correlated_neurons_pearson": _NUMS,
    "correlated_features_indices": _INTS, "correlated_features_l1": _NUMS, "correlated_features_pearson": _NUMS,
    "neg_str": _STRS, "neg_values": _NUMS, "pos_str": _STRS, "pos_values": _NUMS,
    "frac_nonzero": _NUM,
    "freq_hist_data_bar_values": _NUMS, "freq_hist_data_bar_heights": _NUMS,
    "logits_hist_data_bar_heights": _NUMS, "logits_hist_data_bar_values": _NUMS,
    "n_prompts_total": _INT, "n_tokens_in_prompt": _INT, "dataset": _STR,
    "decoder_weights_dist": _NUMS,
    "activations": _LIST,
}
_ACTIVATION_SCHEMA = {"bin_min": _NUM, "bin_max": _NUM, "bin_contains": _NUM, "tokens": _STRS, "values": _NUMS,
                      "qualifying_token_index": _INT}
_SAME_LENGTH = (("pos_str", "pos_values"), ("neg_str", "neg_values"),
                ("freq_hist_data_bar_values", "freq_hist_data_bar_heights"),
                ("logits_hist_data_bar_values", "logits_hist_data_bar_heights"))

NEURONPEDIA_FEATURE_FIELDS = tuple(_FEATURE_SCHEMA)
"""The keys of one feature in a batch file, in SAEDashboard's order."""
TOP_BIN = -1
"""bin_min and bin_contains of the top-activations group."""
SKIPPED_FILE = "skipped_indexes.json"
_BATCH_NAME = re.compile(r"batch-(\d+)\.json")


def _num(x) -> float:
    return float(f"{float(x):.6g}")


def _activation(example, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    return {"bin_min": _num(bin_min), "bin_max": _num(bin_max), "bin_contains": _num(bin_contains),
            "tokens": list(example.tokens), "values": [_num(v) for v in example.values],
            "qualifying_token_index": int(example.focus)}


def _trimmed(heights: Sequence[int]) -> slice:
    nonzero = [i for i, h in enumerate(heights) if h]
    return slice(nonzero[0], nonzero[-1] + 1) if nonzero else slice(0, 0)


def to_neuronpedia(report: FeatureReport, *, dataset: str = "", n_prompts_total: int = 0,
                   n_tokens_in_prompt: int = 0) -> dict:
    """One feature of a batch file (see the module docstring for the mapping)."""
    if len(report.hist_edges) != len(report.hist) + 1:
        raise UsageError(f"feature {report.index}: {len(report.hist)} histogram bins need "
                         f"{len(report.hist) + 1} hist_edges, got {len(report.hist_edges)}")
    logit_counts, logit_edges = report.logit_hist
    if logit_counts and len(logit_edges) != len(logit_counts) + 1:
        raise UsageError(f"feature {report.index}: {len(logit_counts)} logit histogram bins need "
                         f"{len(logit_counts) + 1} edges, got {len(logit_edges)}")
    activations = [_activation(ex, TOP_BIN, report.max, TOP_BIN) for ex in report.top]
    n_sampled = sum(len(q.examples) for q in report.quantiles)
    for q in report.quantiles:
        activations += [_activation(ex, q.lo, q.hi, len(q.examples) / n_sampled) for ex in q.examples]
    keep = _trimmed(report.hist)
    edges = report.hist_edges
    return {
        "feature_index": int(report.index),
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [int(g) for g, _, _ in report.correlated], "correlated_features_l1": [],
        "correlated_features_pearson": [_num(r) for _, r, _ in report.correlated],
        "neg_str": [tok for tok, _ in report.neg_logits], "neg_values": [_num(v) for _, v in report.neg_logits],
        "pos_str": [tok for tok, _ in report.pos_logits], "pos_values": [_num(v) for _, v in report.pos_logits],
        "frac_nonzero": _num(report.frac_nonzero),
        "freq_hist_data_bar_values": [_num(10 ** ((edges[i] + edges[i + 1]) / 2))
                                      for i in range(len(report.hist))[keep]],
        "freq_hist_data_bar_heights": [int(h) for h in report.hist[keep]],
        "logits_hist_data_bar_heights": [int(c) for c in logit_counts],
        "logits_hist_data_bar_values": [_num((logit_edges[i] + logit_edges[i + 1]) / 2)
                                        for i in range(len(logit_counts))],
        "n_prompts_total": int(n_prompts_total), "n_tokens_in_prompt": int(n_tokens_in_prompt),
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": activations,
    }


def neuronpedia_batches(reports: Iterable[FeatureReport], *, model_id: str, layer: int | str, sae_set: str,
                        sae_id_suffix: str | None = None, batch_size: int = 128, dataset: str = "",
                        n_prompts_total: int = 0, n_tokens_in_prompt: int = 0) -> list[dict]:
    """The batch files' contents: `batch_size` features each, in the order of `reports`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size {batch_size!r}: need an int >= 1")
    features, seen = [], set()
    for report in reports:
        if report.index in seen:
            raise UsageError(f"feature {report.index} has two reports; pass one report per feature")
        seen.add(report.index)
        features.append(to_neuronpedia(report, dataset=dataset, n_prompts_total=n_prompts_total,
                                       n_tokens_in_prompt=n_tokens_in_prompt))
    return [{"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": sae_id_suffix,
             "features": features[i:i + batch_size]} for i in range(0, len(features), batch_size)]


def _check(value, expected: str, path: str) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    if expected in (_INTS, _NUMS, _STRS, _LIST):
        if not isinstance(value, list):
            raise UsageError(f"{path}: need a list, got {type(value).__name__}")
        each = {_INTS: is_int, _NUMS: is_num, _STRS: lambda v: isinstance(v, str), _LIST: lambda v: True}[expected]
        bad = next((i for i, v in enumerate(value) if not each(v)), None)
        if bad is not None:
            raise UsageError(f"{path}[{bad}]: {value[bad]!r} is not a finite {expected.rstrip('s')}")
    elif not {_INT: is_int, _NUM: is_num, _STR: lambda v: isinstance(v, str)}[expected](value):
        raise UsageError(f"{path}: {value!r} is not a finite {expected}" if expected == _NUM else
                         f"{path}: need {'an' if expected == _INT else 'a'} {expected}, got {type(value).__name__}")


def _check_fields(obj, schema: dict, path: str) -> None:
    if not isinstance(obj, dict):
        raise UsageError(f"{path or 'feature'}: need an object, got {type(obj).__name__}")
    for key, expected in schema.items():
        where = f"{path}.{key}" if path else key
        if key not in obj:
            raise UsageError(f"{where}: missing; a Neuronpedia feature needs {', '.join(schema)}")
        _check(obj[key], expected, where)


def _validate_feature(feature, path: str) -> None:
    _check_fields(feature, _FEATURE_SCHEMA, path)
    dot = f"{path}." if path else ""
    for a, b in _SAME_LENGTH:
        if len(feature[a]) != len(feature[b]):
            raise UsageError(f"{dot}{b}: {len(feature[b])} entries for {len(feature[a])} in {dot}{a}")
    for i, act in enumerate(feature["activations"]):
        where = f"{dot}activations[{i}]"
        _check_fields(act, _ACTIVATION_SCHEMA, where)
        if not act["values"] or len(act["values"]) != len(act["tokens"]):
            raise UsageError(f"{where}.values: {len(act['values'])} values for {len(act['tokens'])} tokens "
                             "(need one per token, at least one)")
        if not 0 <= act["qualifying_token_index"] < len(act["tokens"]):
            raise UsageError(f"{where}.qualifying_token_index: {act['qualifying_token_index']} is outside "
                             f"its {len(act['tokens'])} tokens")


def validate_neuronpedia(obj) -> None:
    """Check a batch (a dict with `features`) or one feature against the import format; raise
    `UsageError` naming the first missing or mistyped field by its key path."""
    if not (isinstance(obj, dict) and "features" in obj):
        _validate_feature(obj, "")
        return
    for key, ok, need in (("model_id", lambda v: isinstance(v, str), "a str"),
                          ("layer", lambda v: isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)),
                           "an int or str"),
                          ("sae_set", lambda v: isinstance(v, str), "a str"),
                          ("sae_id_suffix", lambda v: v is None or isinstance(v, str), "a str or null")):
        if key not in obj:
            raise UsageError(f"{key}: missing; a Neuronpedia batch needs model_id, layer, sae_set, "
                             "sae_id_suffix, features")
        if not ok(obj[key]):
            raise UsageError(f"{key}: need {need}, got {obj[key]!r}")
    _check(obj["features"], _LIST, "features")
    for i, feature in enumerate(obj["features"]):
        _validate_feature(feature, f"features[{i}]")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, allow_nan=False, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def write_neuronpedia(out_dir, reports: Iterable[FeatureReport], *, model_id: str, layer: int | str, sae_set: str,
                      sae_id_suffix: str | None = None, batch_size: int = 128, n_features: int | None = None,
                      dataset: str = "", n_prompts_total: int = 0, n_tokens_in_prompt: int = 0) -> list[Path]:
    """Write `batch-{i}.json` (each validated first, each under a temporary name then renamed) and
    `skipped_indexes.json` (the indices below `n_features`, the dictionary's width, without a report;
    empty when it is None) into `out_dir`. Returns the paths written, batches first."""
    out_dir = Path(out_dir)
    reports = list(reports)
    batches = neuronpedia_batches(reports, model_id=model_id, layer=layer, sae_set=sae_set,
                                  sae_id_suffix=sae_id_suffix, batch_size=batch_size, dataset=dataset,
                                  n_prompts_total=n_prompts_total, n_tokens_in_prompt=n_tokens_in_prompt)
    for batch in batches:
        validate_neuronpedia(batch)
    reported = {r.index for r in reports}
    if n_features is not None and any(not 0 <= i < n_features for i in reported):
        raise UsageError(f"n_features {n_features}: reports name features {sorted(reported)[0]}.."
                         f"{sorted(reported)[-1]}; pass the dictionary's width (d_sae)")
    if out_dir.is_dir():
        stale = sorted(p.name for p in out_dir.iterdir()
                       if (m := _BATCH_NAME.fullmatch(p.name)) and int(m.group(1)) >= len(batches))
        if stale:
            raise UsageError(f"{out_dir} holds {stale} from another export, which Neuronpedia would import too; "
                             "write into an empty directory or delete them")
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = [i for i in range(n_features or 0) if i not in reported]
    paths = [out_dir / f"batch-{i}.json" for i in range(len(batches))] + [out_dir / SKIPPED_FILE]
    for path, batch in zip(paths, batches):
        _write_json(path, batch)
    _write_json(paths[-1], {"model_id": model_id, "layer": str(layer), "sae_set": sae_set,
                            "skipped_indexes": skipped})
    return paths
