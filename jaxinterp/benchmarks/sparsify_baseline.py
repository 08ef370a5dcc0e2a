"""CPU throughput of EleutherAI's `sparsify` training a TopK SAE, as a benchmark baseline.

`sparsify` (PyPI `eai-sparsify`, written against version 1.3.3) and `torch` are never
dependencies of jaxinterp: they are imported only inside the functions below, and
`available()` says whether they can be. Install them in a separate environment, e.g.::

    python3 -m venv /work/sparsify-venv
    /work/sparsify-venv/bin/pip install torch==2.13.0   # the CPU wheel
    /work/sparsify-venv/bin/pip install eai-sparsify

and run ``python -m jaxinterp.benchmarks.sparsify_baseline --d-in 256 --d-sae 2048``
from the repository root with that environment's python; it prints one JSON line. With
``--fit-npy ACTS.npy --order ORDER.npy --out DIR`` it instead runs sparsify's own training call,
`Trainer.fit`, on the rows of an activation file (see `fit_npy`).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path
from jaxinterp.errors import UsageError


def _import_sparsify():
    """Import torch and sparsify, swallowing the line sparsify prints about Triton."""
    import torch

    with contextlib.redirect_stdout(io.StringIO()):
        import sparsify
        import sparsify.utils
    return torch, sparsify


def available() -> bool:
    """True when `import sparsify` and `import torch` both work."""
    try:
        _import_sparsify()
    except Exception:
        return False
    return True


def sparsify_tokens_per_s(
    d_in: int,
    d_sae: int,
    k: int,
    batch_size: int,
    steps: int = 20,
    warmup: int = 3,
    seed: int = 0,
    *,
    auxk: bool = False,
) -> float:
    """Tokens per second of sparsify's TopK SAE training step, float32 on CPU.

    Written against eai-sparsify 1.3.3 (torch 2.13.0 CPU). The model is sparsify's own
    `SparseCoder(d_in, SparseCoderConfig(activation="topk", num_latents=d_sae, k=k))`
    (float32, normalize_decoder=True, no skip connection, no multi-TopK), trained with
    `torch.optim.Adam` over all its parameters (lr as sparsify's trainer picks it,
    2e-4 / sqrt(d_sae / 2**14); no lr scheduler). Torch uses `os.cpu_count()` threads.
    Inputs are one fixed batch of standard-normal rows, [batch_size, d_in]; `b_dec` is set
    to its mean once before timing, as the trainer does on its first step.

    One timed step is what `sparsify.Trainer.fit` does per batch for `loss_fn="fvu"`:

    1. `set_decoder_norm_to_unit_norm()` (renormalise decoder rows);
    2. forward `sae(x, dead_mask=..., total_variance=...)`: `x - b_dec`, sparsify's
       `fused_encoder` (linear + ReLU + `torch.topk`, with its custom index_add /
       embedding_bag backward), then the sparse decoder `sparsify.utils.decoder_impl`,
       which on CPU is its eager `F.embedding_bag` path (Triton is neither installed
       with the CPU wheel nor usable on CPU tensors), the residual and FVU;
    3. loss = `fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8` (multi_topk_fvu is 0)
       and `loss.backward()`;
    4. the dead-latent bookkeeping (`did_fire` from the top-k indices, tokens-since-fired
       counters);
    5. `remove_gradient_parallel_to_decoder_directions()`, `optimizer.step()`,
       `optimizer.zero_grad()`.

    AuxK: sparsify 1.3.3's trainer defaults to `auxk_alpha=0`, and even when it is set
    the AuxK pass runs only once some latent has gone `dead_feature_threshold` tokens
    without firing, which never happens in a short timed run. So by default
    (`auxk=False`) no AuxK work is timed. With `auxk=True`, every latent is marked
    dead and the loss adds `auxk_alpha * auxk_loss` with alpha 1/32: the second top-k
    (k_aux = d_in // 2) over the pre-activations and the second sparse decode are then
    in every step, as they are in a jaxinterp TopK step that keeps its aux-k term on.

    This mirrors the work of jaxinterp's TopK train step (encode, top-k, sparse decode,
    MSE/FVU loss, backward, decoder-norm gradient projection and renormalisation, Adam).

    Returns batch_size * steps / elapsed seconds over the `steps` timed steps, after
    `warmup` untimed ones.
    """
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    torch, sparsify = _import_sparsify()

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        torch.manual_seed(seed)
        cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=d_sae, k=k)
        sae = sparsify.SparseCoder(d_in, cfg, device="cpu", dtype=torch.float32)
        optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)

        x = torch.randn(batch_size, d_in, dtype=torch.float32)
        with torch.no_grad():
            sae.b_dec.data = x.mean(0)

        auxk_alpha = 1 / 32 if auxk else 0.0
        dead_mask = torch.ones(d_sae, dtype=torch.bool) if auxk else None
        did_fire = torch.zeros(d_sae, dtype=torch.bool)
        tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)

        def step() -> None:
            sae.set_decoder_norm_to_unit_norm()
            total_variance = (x - x.mean(0)).pow(2).sum()
            out = sae(x, dead_mask=dead_mask, total_variance=total_variance)
            did_fire[out.latent_indices.flatten()] = True
            loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                tokens_since_fired.add_(batch_size)
                tokens_since_fired[did_fire] = 0
                did_fire.zero_()

        for _ in range(warmup):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(prev_threads)
    return batch_size * steps / elapsed


def fit_npy(path: str, order_path: str, out_dir: str, d_sae: int, k: int, batch_size: int, *,
            seq_len: int = 128, seed: int = 0) -> dict:
    """Train sparsify's TopK SAE with `sparsify.Trainer.fit`, its defaults otherwise, on rows of
    the activation file `path` [N, D], visited in the order of `order_path` (int64 row indices,
    one batch after another); returns `{"tokens_per_s", "fit_seconds", "weights"}`.

    sparsify trains on a language model's activations, read by a forward hook at a module it is
    told to watch. Here the "model" is one `nn.Embedding` whose table is the memory-mapped file:
    token ids are row indices, so the hooked module outputs exactly the listed rows. The dataset
    is those ids cut into sequences of `seq_len`, `batch_size // seq_len` sequences a batch, so a
    batch is `batch_size` rows. Everything else is sparsify's default: `TrainConfig` with
    `loss_fn="fvu"`, its default optimizer (signum, schedule-free) and learning rate
    (5e-3 / sqrt(d_sae / 2^14)), `auxk_alpha=0`, `b_dec` set to the first batch's mean; the SAE as
    `Trainer.fit` saves it at the end (the schedule-free average) goes to `out_dir`.
    Times the `fit()` call only (what sparsify's users wait for), not loading the file.
    """
    import warnings

    import numpy as np

    torch, sparsify = _import_sparsify()
    import transformers

    if batch_size % seq_len:
        raise UsageError(f"batch_size {batch_size} is not a multiple of seq_len {seq_len}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a read-only memory map becomes a read-only tensor
        table = torch.from_numpy(np.load(path, mmap_mode="r"))
    if table.dtype != torch.float32:
        table = table.float()
    order = np.load(order_path).astype(np.int64)
    n_seq = len(order) // seq_len
    dataset = [{"input_ids": torch.from_numpy(order[i * seq_len : (i + 1) * seq_len])} for i in range(n_seq)]

    class RowsConfig(transformers.PretrainedConfig):
        model_type = "activation_rows"

    class Rows(transformers.PreTrainedModel):
        config_class = RowsConfig

        def __init__(self, config):
            super().__init__(config)
            self.rows = torch.nn.Embedding.from_pretrained(table, freeze=True)

        def forward(self, input_ids, **_):
            return self.rows(input_ids)

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    model = Rows(RowsConfig(num_hidden_layers=1))
    cfg = sparsify.TrainConfig(
        sparsify.SparseCoderConfig(activation="topk", num_latents=d_sae, k=k),
        batch_size=batch_size // seq_len, hookpoints=["rows"], log_to_wandb=False, save_dir=out_dir,
        run_name="sae", save_every=10**9, init_seeds=[seed],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = sparsify.Trainer(cfg, dataset, model)
        start = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - start
    steps = n_seq // cfg.batch_size
    return {"tokens_per_s": steps * batch_size / elapsed, "fit_seconds": elapsed, "steps": steps,
            "weights": str(Path(out_dir) / "sae" / "rows" / "sae.safetensors")}


def _main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auxk", action="store_true", help="time the AuxK pass too (all latents dead)")
    p.add_argument("--fit-npy", help="run sparsify.Trainer.fit on this activation file instead")
    p.add_argument("--order", help="with --fit-npy: .npy of the row indices to visit, batch after batch")
    p.add_argument("--out", help="with --fit-npy: where sparsify saves the trained SAE")
    a = p.parse_args()
    if not available():
        raise SystemExit("sparsify and torch are not importable in this environment")
    torch, sparsify = _import_sparsify()
    if a.fit_npy:
        res = fit_npy(a.fit_npy, a.order, a.out, a.d_sae, a.k, a.batch_size, seed=a.seed)
        print(json.dumps({**res, "sparsify": sparsify.__version__, "torch": torch.__version__,
                          "threads": os.cpu_count()}))
        return
    tps = sparsify_tokens_per_s(
        a.d_in, a.d_sae, a.k, a.batch_size, steps=a.steps, warmup=a.warmup, seed=a.seed, auxk=a.auxk
    )
    print(json.dumps({**vars(a), "tokens_per_s": tps, "sparsify": sparsify.__version__,
                      "torch": torch.__version__, "decoder_impl": sparsify.utils.decoder_impl.__name__,
                      "threads": os.cpu_count()}))


if __name__ == "__main__":
    _main()
