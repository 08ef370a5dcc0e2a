"""Regenerate the EleutherAI clt-training fixture: a tiny cross-layer transcoder written by that
repository's own code (its `SparseCoder.save_to_disk` folders and a run's `config.json`), and the
outputs its `CrossLayerRunner` computes for random inputs.

    PYTHONPATH=/path/to/clt-training python tests/data/clt_training/make.py

(a checkout of github.com/EleutherAI/clt-training, commit cf9821f; its package is named `sparsify`,
so it must come before EleutherAI's sparsify on the path; CPU torch is enough).
"""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import sparsify.utils as utils
from sparsify.config import SparseCoderConfig
from sparsify.runner import CrossLayerRunner
from sparsify.sparse_coder import SparseCoder

# safetensors refuses tensors that share storage (W_dec and W_decs.0 alias in memory): save copies
utils.save_file = lambda sd, fn: save_file({k: v.clone().contiguous() for k, v in sd.items()}, fn)

OUT = Path(__file__).resolve().parent
L, D, M, K, CROSS = 4, 8, 16, 3, 2
torch.manual_seed(0)
base = SparseCoderConfig(transcode=True, skip_connection=True, num_latents=M, k=K, coalesce_topk="concat",
                         topk_coalesced=False, post_encoder_scale=True, normalize_io=True)
hookpoints = [f"layers.{p}.mlp" for p in range(L)]
coders, sources = {}, []
for p, name in enumerate(hookpoints):  # the trainer's n_targets / n_sources for cross_layer=CROSS
    n_targets = min(CROSS, L - p)
    sources.append(p + n_targets)
    while sources[0] < p:
        sources.pop(0)
    coder = SparseCoder(D, replace(base, n_targets=n_targets, n_sources=len(sources)), dtype=torch.float32)
    with torch.no_grad():
        for _, prm in coder.named_parameters():
            prm.copy_(torch.randn_like(prm) * 0.3)
        for _, buf in coder.named_buffers():
            buf.copy_(torch.rand_like(buf) + 1.0)
    coder.save_to_disk(OUT / "run" / name)
    coders[name] = coder
config = {"model": "HuggingFaceTB/SmolLM2-135M", "hookpoints": hookpoints, "cross_layer": CROSS,
          "sae": asdict(base)}
(OUT / "run" / "config.json").write_text(json.dumps(config, indent=1) + "\n")

loaded = {name: SparseCoder.load_from_disk(OUT / "run" / name) for name in hookpoints}
rows = 6
x = torch.randn(L, rows, D) * 2.0
runner, acts, outs = CrossLayerRunner(), [], []
with torch.no_grad():
    for p, (name, coder) in enumerate(loaded.items()):
        mid = runner.encode(x[p], coder)
        dense = torch.zeros(rows, M).scatter_(1, mid.latent_indices, mid.latent_acts)
        acts.append(dense)
        outs.append(runner.decode(mid, torch.zeros(rows, D), name).sae_out)
np.savez(OUT / "reference.npz", x=x.numpy(), acts=torch.stack(acts).numpy(), y=torch.stack(outs).numpy())
print("wrote", OUT, "y norm", float(torch.stack(outs).norm()), "sqrt(d)", math.sqrt(D))
