"""`launch/inspect_checkpoint.py`: what a run, a checkpoint and an artifact hold, read from metadata alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import subprocess_env

from conftest import REPO
from jaxinterp.config import config_from_dict
from jaxinterp.interop.contents import InspectError, describe
from jaxinterp.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspect") / "run"
    train(config_from_dict({
        "data": {"source": "synthetic", "synthetic": {"n_features": 64, "d_in": 16}},
        "dictionary": {"activation": "topk", "d_sae": 64, "k": 4},
        "train": {"tokens": 64 * 10, "batch_size": 64, "lr_warmup_steps": 2},
        "mesh": {"data": 4, "model": 2},
        "output": {"dir": str(d), "log_every": 5, "checkpoint_every": 5, "eval_tokens": 256, "progress": False},
    }), log=lambda s: None)
    return d


def test_a_run_its_checkpoints_and_its_artifact_described(run):
    d = describe(run)
    assert d["kind"] == "run" and d["steps"] == [5, 10] and d["step"] == 10 and d["artifact"]
    assert d["config"]["mesh"] == {"data": 4, "model": 2} and d["dictionary"]["d_sae"] == 64
    w_enc = d["arrays"]["params.W_enc"]
    assert w_enc["shape"] == [16, 64] and w_enc["dtype"] == "float32"
    assert w_enc["sharding"] == {"mesh": [4, 2], "axes": ["data", "model"], "spec": [None, "model"]}
    assert d["arrays"]["opt_state.0.mu.W_dec"]["sharding"]["spec"] == ["model", None]
    # one process's position: the init batches, then one batch a step
    assert d["data"] == {"processes": [{"next_batch": d["config"]["train"]["init_batches"] + 10}]}
    step5 = describe(run / "checkpoints" / "5")
    assert step5["kind"] == "checkpoint" and step5["step"] == 5 and step5["arrays"].keys() == d["arrays"].keys()
    art = describe(run / "dictionary")
    assert art["kind"] == "artifact" and art["arrays"]["W_dec"]["shape"] == [64, 16]
    assert art["dictionary"]["spec"]["k"] == 4


def test_the_cli_prints_it_and_refuses_other_folders_in_one_line(run, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "launch/inspect_checkpoint.py", *args], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)

    out = cli(str(run), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["arrays"]["params.W_enc"]["sharding"]["spec"] == [None, "model"]
    human = cli(str(run))
    assert "params.W_enc" in human.stdout and "P(None, model) on data=4xmodel=2" in human.stdout
    (tmp_path / "notes.txt").write_text("x")
    bad = cli(str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "expected a run directory" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    with pytest.raises(InspectError, match="not found"):
        describe(tmp_path / "missing")


def test_no_launch_script_stands_in_for_a_standard_library_module():
    """A script's folder comes first on its import path: launch/inspect.py would replace `inspect`
    for every entry point beside it (numpy and jax fail to import)."""
    from pathlib import Path

    clashes = [p.name for p in (Path(REPO) / "launch").rglob("*.py") if p.stem in sys.stdlib_module_names]
    assert clashes == []
