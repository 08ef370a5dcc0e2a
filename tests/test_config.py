"""Run configuration (`jaxinterp.config`): YAML, `--set` overrides, and one-line errors naming the key."""

from __future__ import annotations

import glob
import os
import re

import pytest

from jaxinterp.config import Config, ConfigError, config_from_dict, config_to_dict, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


YAML = """
data:
  source: synthetic
  synthetic: {n_features: 128, d_in: 32, p_active: 0.02}
dictionary: {activation: jumprelu, d_sae: 256, l0_coefficient: 0.002}
train: {tokens: 100000, batch_size: 512, lr: 3.0e-4}
mesh: {data: 2, model: 2}
output: {dir: runs/x, progress: false}
"""


def test_yaml_loads_into_typed_config(tmp_path):
    cfg = load_config(write(tmp_path, YAML))
    assert isinstance(cfg, Config)
    assert cfg.data.synthetic.n_features == 128 and cfg.data.synthetic.d_in == 32
    assert cfg.data.synthetic.p_active == 0.02
    assert cfg.dictionary.activation == "jumprelu" and cfg.dictionary.d_sae == 256
    assert cfg.dictionary.l0_coefficient == 0.002
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 100000 // 512
    assert (cfg.mesh.data, cfg.mesh.model) == (2, 2)
    assert cfg.output.progress is False
    # unspecified keys keep their defaults
    assert cfg.train.lr_schedule == "linear" and cfg.dictionary.k == 32
    # frozen
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_empty_file_and_no_file_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(None) == Config()


def test_round_trip_through_dict(tmp_path):
    cfg = load_config(write(tmp_path, YAML))
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, YAML), [
        "train.lr=1e-3",                       # YAML 1.1 reads 1e-3 as a string: must still be a float
        "train.batch_size=1024",
        "data.synthetic.n_features=96",        # nested section
        "data.synthetic.magnitude=exponential",
        "dictionary.activation=topk",
        "dictionary.k=8",
        "output.progress=true",
        "data.site=blocks.6.resid_post",
    ])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 1024
    assert cfg.data.synthetic.n_features == 96 and cfg.data.synthetic.d_in == 32  # sibling kept
    assert cfg.data.synthetic.magnitude == "exponential"
    assert cfg.dictionary.activation == "topk" and cfg.dictionary.k == 8
    assert cfg.dictionary.d_sae == 256  # from the file
    assert cfg.output.progress is True
    assert cfg.data.site == "blocks.6.resid_post"


def test_overrides_without_file_create_sections():
    cfg = load_config(None, ["data.synthetic.d_in=48", "train.seed=7", "train.tokens=2e6"])
    assert cfg.data.synthetic.d_in == 48 and cfg.train.seed == 7
    assert cfg.train.tokens == 2_000_000 and isinstance(cfg.train.tokens, int)


def test_later_override_wins():
    assert load_config(None, ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == 2e-3


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, "a config error is one line"
    return msg


@pytest.mark.parametrize("override,key,close", [
    ("train.lrr=1e-3", "train.lrr", "train.lr"),
    ("dictionary.actvation=relu", "dictionary.actvation", "dictionary.activation"),
    ("data.synthetic.n_feature=10", "data.synthetic.n_feature", "data.synthetic.n_features"),
    ("trian.lr=1e-3", "trian", "train"),
])
def test_unknown_key_suggests_close_match(override, key, close):
    msg = _error(None, [override])
    assert msg.startswith(key + ":"), msg
    assert "unknown key" in msg
    hint = msg.split("did you mean", 1)
    assert len(hint) == 2, msg
    # the suggestion is the full dotted key, ready to paste back into --set
    assert re.search(rf"(^|[\s'\"]){re.escape(close)}($|[\s'\"?])", hint[1]), msg


def test_unknown_key_in_yaml(tmp_path):
    msg = _error(write(tmp_path, "train:\n  batch_sise: 64\n"))
    assert msg.startswith("train.batch_sise:") and "did you mean" in msg and "batch_size" in msg


def test_unknown_key_without_close_match_lists_known_keys():
    msg = _error(None, ["mesh.zzzzzz=1"])
    assert msg.startswith("mesh.zzzzzz:") and "data" in msg and "model" in msg


@pytest.mark.parametrize("overrides,key,words", [
    (["dictionary.d_sae=16", "dictionary.k=32"], "dictionary.k", ["32", "16"]),
    (["train.lr=-1e-3"], "train.lr", ["> 0"]),
    (["train.lr=0"], "train.lr", ["> 0"]),
    (["dictionary.activation=softmax"], "dictionary.activation", ["softmax", "topk", "jumprelu"]),
    (["train.batch_size=abc"], "train.batch_size", ["integer", "abc"]),
    (["train.lr=fast"], "train.lr", ["number", "fast"]),
    (["output.progress=maybe"], "output.progress", ["maybe"]),
    (["data.source=npy"], "data.path", ["npy"]),
    (["data.source=parquet"], "data.source", ["parquet", "npy", "synthetic"]),
    (["data.synthetic.p_active=1.5"], "data.synthetic.p_active", ["1.5"]),
    (["train.tokens=100", "train.batch_size=256"], "train.tokens", ["100", "256"]),
    (["mesh.data=-1", "mesh.model=-1"], "mesh", ["-1"]),
    (["dictionary.d_in=10", "data.synthetic.d_in=12"], "dictionary.d_in", ["10", "12"]),
    (["dictionary.d_sae=16", "dictionary.k=4", "dictionary.aux_k=17"], "dictionary.aux_k", ["17", "16"]),
])
def test_bad_values_name_the_key(overrides, key, words):
    msg = _error(None, overrides)
    assert msg.startswith(key + ":"), msg
    for w in words:
        assert w in msg, (w, msg)


def test_non_integer_for_int_key_is_rejected_in_any_spelling():
    """`train.batch_size=2.5` is refused; so must be 2.5e0 (a string to YAML 1.1), not truncated to 2."""
    assert _error(None, ["train.batch_size=2.5"]).startswith("train.batch_size:")
    assert _error(None, ["train.batch_size=2.5e0"]).startswith("train.batch_size:")


def test_override_errors():
    assert "key=value" in _error(None, ["train.lr"])
    msg = _error(None, ["train.lr=1e-3", "train.lr.peak=1"])
    assert "train.lr" in msg and "not a section" in msg
    assert _error(None, ["train.lr.peak=1"]).startswith("train.lr:")
    msg = _error(None, ["train=3"])
    assert msg.startswith("train:") and "mapping" in msg


def test_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert missing in _error(missing)
    assert "not valid YAML" in _error(write(tmp_path, "train: [1, 2\n"))
    assert "mapping" in _error(write(tmp_path, "- 1\n- 2\n"))


CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.y*ml"), recursive=True))


def test_configs_dir_has_yaml():
    assert CONFIGS, "configs/ holds at least one YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO) for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    d = cfg.dictionary
    if d.d_sae is not None and d.activation in ("topk", "batchtopk"):
        assert d.k <= d.d_sae
