"""Metric lines to `<output.dir>/metrics.jsonl`, and to TensorBoard when tensorboardX is installed."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    def __init__(self, run_dir: str | Path, *, truncate_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run rewrites the lines logged after its checkpoint.
            keep = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= truncate_after_step
                    and not json.loads(l).get("final")]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif truncate_after_step is None:
            self.path.write_text("")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False)
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(("eval/" if record.get("final") else "train/") + k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
