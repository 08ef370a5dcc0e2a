"""Neuronpedia batch files from hand-built FeatureReports: written, read back, checked field by field."""

import json
import math

import pytest

from jaxinterp.errors import UsageError
from jaxinterp.features.neuronpedia import (NEURONPEDIA_FEATURE_FIELDS, neuronpedia_batches, to_neuronpedia,
                                            validate_neuronpedia, write_neuronpedia)
from jaxinterp.features.report import Example, FeatureReport, QuantileBin

EDGES = (-2.0, -1.0, 0.0, 1.0, 2.0)


def _report(index, count=6, n_tokens=1000, scale=1.0, hist=(0, 3, 0, 3)):
    top = (Example(("The", " cat", " sat"), (0.0, 4.5 * scale, 1.0), 1, 17),
           Example((" a", " dog"), (3.25 * scale, 0.0), 0, 40))
    quantiles = (QuantileBin(0.25, 0.5, (Example((" x", " y"), (0.0, 0.5), 1, 3),
                                         Example((" z",), (0.25,), 0, 9))),
                 QuantileBin(0.75, 4.5 * scale, (Example((" p", " q", " r"), (0.75, 2.0, 0.0), 1, 60),)))
    return FeatureReport(index=index, count=count, n_tokens=n_tokens, mean=1.5, max=4.5 * scale,
                         hist=hist, hist_edges=EDGES, top=top, quantiles=quantiles,
                         pos_logits=((" Paris", 2.5), (" France", 1.25), (" Lyon", 0.5)),
                         neg_logits=((" the", -1.75), (" of", -0.5)),
                         logit_hist=((1, 2, 3), (-1.0, -0.5, 0.0, 0.5)))


def _dead(index):
    return FeatureReport(index=index, count=0, n_tokens=1000, mean=0.0, max=0.0, hist=(0, 0, 0, 0),
                         hist_edges=EDGES, pos_logits=((" a", 0.125),), neg_logits=((" b", -0.125),),
                         logit_hist=((2,), (-0.25, 0.25)))


REPORTS = [_report(3), _report(7, count=2, n_tokens=800, scale=2.0, hist=(0, 0, 1, 1)), _dead(9)]
META = dict(model_id="gpt2-small", layer=6, sae_set="res-jaxinterp")


def test_write_reload_and_map(tmp_path):
    paths = write_neuronpedia(tmp_path / "np", REPORTS, batch_size=2, n_features=12, dataset="owt", **META)
    assert [p.name for p in paths] == ["batch-0.json", "batch-1.json", "skipped_indexes.json"]
    assert sorted(p.name for p in (tmp_path / "np").iterdir()) == [p.name for p in paths]  # no temp files left
    batches = [json.loads(p.read_text()) for p in paths[:2]]
    for batch in batches:
        validate_neuronpedia(batch)
        assert {k: batch[k] for k in ("model_id", "layer", "sae_set", "sae_id_suffix")} == {
            "model_id": "gpt2-small", "layer": 6, "sae_set": "res-jaxinterp", "sae_id_suffix": None}
    features = batches[0]["features"] + batches[1]["features"]
    assert [len(b["features"]) for b in batches] == [2, 1]
    assert json.loads(paths[2].read_text()) == {"model_id": "gpt2-small", "layer": "6", "sae_set": "res-jaxinterp",
                                                "skipped_indexes": [0, 1, 2, 4, 5, 6, 8, 10, 11]}

    for report, feature in zip(REPORTS, features):
        assert tuple(feature) == NEURONPEDIA_FEATURE_FIELDS
        assert feature["feature_index"] == report.index
        assert feature["pos_str"] == [t for t, _ in report.pos_logits]
        assert feature["pos_values"] == [v for _, v in report.pos_logits]
        assert feature["neg_str"] == [t for t, _ in report.neg_logits]
        assert feature["neg_values"] == [v for _, v in report.neg_logits]
        assert feature["frac_nonzero"] == report.count / report.n_tokens
        assert sum(feature["freq_hist_data_bar_heights"]) == report.count
        assert feature["logits_hist_data_bar_heights"] == list(report.logit_hist[0])
        assert feature["dataset"] == "owt"

    fired, dead = features[0], features[2]
    # empty end bins dropped, the empty middle one kept; centers are 10 ** (log10 midpoint)
    assert fired["freq_hist_data_bar_heights"] == [3, 0, 3]
    assert fired["freq_hist_data_bar_values"] == pytest.approx([10 ** -0.5, 10 ** 0.5, 10 ** 1.5], rel=1e-5)
    assert fired["logits_hist_data_bar_values"] == [-0.75, -0.25, 0.25]
    assert dead["activations"] == [] and dead["freq_hist_data_bar_heights"] == [] and dead["frac_nonzero"] == 0.0
    assert dead["freq_hist_data_bar_values"] == []

    report = REPORTS[0]
    examples = list(report.top) + [ex for q in report.quantiles for ex in q.examples]
    groups = [(-1, 4.5, -1)] * 2 + [(0.25, 0.5, 0.666667)] * 2 + [(0.75, 4.5, 0.333333)]
    assert len(fired["activations"]) == len(examples)
    for act, ex, (lo, hi, share) in zip(fired["activations"], examples, groups):
        assert (act["bin_min"], act["bin_max"], act["bin_contains"]) == (lo, hi, share)
        assert act["tokens"] == list(ex.tokens) and act["values"] == list(ex.values)
        assert act["qualifying_token_index"] == ex.focus
        # what Neuronpedia's converter derives: maxValue / maxValueTokenIndex
        assert act["values"].index(max(act["values"])) == ex.focus
    assert features[1]["activations"][0]["bin_max"] == 9.0


def test_rewrite_same_dir_and_stale_batches(tmp_path):
    write_neuronpedia(tmp_path, REPORTS, batch_size=1, **META)
    write_neuronpedia(tmp_path, REPORTS, batch_size=1, **META)  # same export again: overwritten
    with pytest.raises(UsageError, match=r"batch-1\.json.*batch-2\.json"):
        write_neuronpedia(tmp_path, REPORTS, batch_size=3, **META)


def test_validate_names_missing_field():
    batch = neuronpedia_batches(REPORTS, **META)[0]
    del batch["features"][1]["pos_str"]
    with pytest.raises(UsageError, match=r"^features\[1\]\.pos_str: missing"):
        validate_neuronpedia(batch)
    feature = to_neuronpedia(REPORTS[0])
    del feature["pos_str"]
    with pytest.raises(UsageError, match=r"^pos_str: missing"):
        validate_neuronpedia(feature)
    del batch["sae_set"]
    with pytest.raises(UsageError, match=r"^sae_set: missing"):
        validate_neuronpedia(batch)


def test_validate_names_mistyped_field():
    feature = to_neuronpedia(REPORTS[0])
    feature["activations"][2]["values"][1] = "0.5"
    with pytest.raises(UsageError, match=r"^activations\[2\]\.values\[1\]: '0\.5' is not a finite number"):
        validate_neuronpedia(feature)
    feature = to_neuronpedia(REPORTS[0])
    feature["pos_values"].pop()
    with pytest.raises(UsageError, match=r"^pos_values: 2 entries for 3 in pos_str"):
        validate_neuronpedia(feature)
    feature = to_neuronpedia(REPORTS[0])
    feature["feature_index"] = "3"
    with pytest.raises(UsageError, match=r"^feature_index: need an int, got str"):
        validate_neuronpedia(feature)


def test_nan_is_refused_before_anything_is_written(tmp_path):
    bad = _report(5)
    bad.pos_logits = ((" Paris", math.nan),)
    with pytest.raises(UsageError, match=r"features\[1\]\.pos_values\[0\]: nan is not a finite number"):
        write_neuronpedia(tmp_path / "out", [_report(1), bad], **META)
    assert not (tmp_path / "out").exists()


def test_bad_arguments():
    with pytest.raises(UsageError, match="batch_size 0"):
        neuronpedia_batches(REPORTS, batch_size=0, **META)
    with pytest.raises(UsageError, match="feature 3 has two reports"):
        neuronpedia_batches([_report(3), _report(3)], **META)
    with pytest.raises(UsageError, match="4 histogram bins need 5 hist_edges, got 3"):
        to_neuronpedia(FeatureReport(index=0, count=1, n_tokens=2, mean=1.0, max=1.0, hist=(0, 1, 0, 0),
                                     hist_edges=(0.0, 1.0, 2.0)))
    with pytest.raises(UsageError, match="n_features 5"):
        write_neuronpedia("/nonexistent-dir-not-written", REPORTS, n_features=5, **META)
