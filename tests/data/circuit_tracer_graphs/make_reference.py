#!/usr/bin/env python
"""The reference graphs in this folder, made by circuit-tracer 0.5.0 itself: a tiny random Llama
(`model/`), a per-layer transcoder set with skips (`set/`) and a cross-layer transcoder (`clt/`) in
circuit-tracer's formats, and `{set,clt}_graph.npz` from `circuit_tracer.attribute`, `prune_graph`
and `compute_graph_scores` for the ids 5,9,4,12,7 (BOS 1 prepended); `*_m20.npz` with
`--max-feature-nodes 20`. tests/test_attribution.py compares jaxinterp's graphs with them.

circuit-tracer 0.5.0 needs transformers <= 4.57.3 and nnsight 0.6.3 (with cloudpickle >= 3), so it
runs in a venv of its own:

    python3 -m venv --system-site-packages /tmp/ct && /tmp/ct/bin/pip install circuit-tracer==0.5.0 \
        nnsight==0.6.3 "cloudpickle>=3"
    /tmp/ct/bin/python make_reference.py --out OUT --tokens 5,9,4,12,7 [--max-feature-nodes 20]

(the model_name in the config.yaml files here was then set to tiny-llama.)
"""

import argparse
import json
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

SEED = 1234
VOCAB = 64
D = 32
N_LAYERS = 3
N_HEADS = 4
N_KV = 2
D_MLP = 64
F = 24
SPECIAL = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2 -> bos id 1 (see quirk: id 0 is skipped)
FIRE_FRAC = 0.25  # target fraction of features firing per token (calibrated)


# ----------------------------------------------------------------------------- model
def build_model(out_dir, tie=False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)

    # --- tokenizer: WordLevel over "<pad> <bos> <eos> w3 ... w63"
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for i in range(len(SPECIAL), VOCAB):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<pad>",
    )
    tok.save_pretrained(model_dir)

    # --- model
    torch.manual_seed(SEED)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV, intermediate_size=D_MLP,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
        tie_word_embeddings=tie, hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial RMSNorm gains
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir, model, tok


# ----------------------------------------------------------------------- calibration
@torch.no_grad()
def collect_acts(model, token_batches):
    """resid_mid (post_attention_layernorm input), mlp_in (its output), per layer."""
    store = {"resid_mid": [[] for _ in range(N_LAYERS)], "mlp_in": [[] for _ in range(N_LAYERS)]}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        def hk(mod, inp, out, l=l):
            store["resid_mid"][l].append(inp[0][:, 1:].reshape(-1, D))
            store["mlp_in"][l].append(out[:, 1:].reshape(-1, D))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(hk))
    for ids in token_batches:
        model(ids)
    for h in hooks:
        h.remove()
    return {k: [torch.cat(v) for v in vs] for k, vs in store.items()}


def calibrated_encoder(x, g, thr_value=0.1):
    """Random W_enc; choose b_enc so that ~FIRE_FRAC of calibration tokens exceed threshold."""
    W_enc = torch.randn(F, D, generator=g) / D ** 0.5 / x.pow(2).mean().sqrt()
    pre = x @ W_enc.T  # [N, F]
    q = torch.quantile(pre, 1.0 - FIRE_FRAC, dim=0)  # [F]
    b_enc = thr_value - q
    threshold = torch.full((F,), thr_value)
    return W_enc.contiguous(), b_enc.contiguous(), threshold


def write_transcoders(out_dir, model):
    g = torch.Generator().manual_seed(SEED + 1)
    calib = [torch.cat([torch.tensor([[1]]), torch.randint(3, VOCAB, (1, 15), generator=g)], 1)
             for _ in range(32)]
    acts = collect_acts(model, calib)

    # ---------------- per-layer transcoder set with skip connection
    set_dir = os.path.join(out_dir, "set")
    os.makedirs(set_dir, exist_ok=True)
    for l in range(N_LAYERS):
        W_enc, b_enc, thr = calibrated_encoder(acts["mlp_in"][l], g)
        sd = {
            "W_enc": W_enc,
            "W_dec": (0.5 * torch.randn(F, D, generator=g)).contiguous(),
            "b_enc": b_enc,
            "b_dec": (0.1 * torch.randn(D, generator=g)).contiguous(),
            "activation_function.threshold": thr,
            "W_skip": (0.2 * torch.randn(D, D, generator=g) / D ** 0.5).contiguous(),
        }
        save_file({k: v.float() for k, v in sd.items()}, os.path.join(set_dir, f"layer_{l}.safetensors"))
    set_cfg = {
        "model_name": os.path.abspath(os.path.join(out_dir, "model")),
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out",
        "scan": "tiny-llama-set",
    }
    with open(os.path.join(set_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(set_cfg, f, sort_keys=False)

    # ---------------- cross-layer transcoder
    clt_dir = os.path.join(out_dir, "clt")
    os.makedirs(clt_dir, exist_ok=True)
    for l in range(N_LAYERS):
        W_enc, b_enc, thr = calibrated_encoder(acts["resid_mid"][l], g)
        save_file(
            {f"W_enc_{l}": W_enc, f"b_enc_{l}": b_enc,
             f"b_dec_{l}": (0.1 * torch.randn(D, generator=g)).contiguous(),
             f"threshold_{l}": thr},
            os.path.join(clt_dir, f"W_enc_{l}.safetensors"),
        )
        save_file(
            {f"W_dec_{l}": (0.3 * torch.randn(F, N_LAYERS - l, D, generator=g)).contiguous()},
            os.path.join(clt_dir, f"W_dec_{l}.safetensors"),
        )
    clt_cfg = {
        "model_name": os.path.abspath(os.path.join(out_dir, "model")),
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
        "scan": "tiny-llama-clt",
    }
    with open(os.path.join(clt_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(clt_cfg, f, sort_keys=False)
    return set_dir, clt_dir


# --------------------------------------------------------------------- replacement
def load_transcoders_local(tc_dir):
    # load_transcoder_from_hub(ref) first checks is_cached(ref): get_cache_dir()/ref/config.yaml.
    # With an absolute ref, Path(cache) / "/abs/dir" == "/abs/dir", so a local directory holding
    # config.yaml + safetensors loads through circuit-tracer's own cache loader (no hub access).
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    return load_transcoder_from_hub(os.path.abspath(tc_dir), device=torch.device("cpu"),
                                    dtype=torch.float32)


def build_tl_model(model_dir, hf_model, tok, transcoders):
    """TransformerLens backend: HookedTransformer.from_pretrained needs an official model name
    (hub config), so build the HookedTransformerConfig by hand and load converted weights."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    c = hf_model.config
    cfg = HookedTransformerConfig(
        d_model=D, d_head=D // N_HEADS, n_heads=N_HEADS, d_mlp=D_MLP, n_layers=N_LAYERS,
        n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=VOCAB, act_fn="silu",
        n_key_value_heads=N_KV, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=D // N_HEADS, rotary_base=c.rope_theta,
        final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM",
        tokenizer_name=model_dir, model_name=model_dir, default_prepend_bos=False,
        dtype=torch.float32, device="cpu",
    )
    from transformers import AutoTokenizer

    # TL's set_tokenizer re-loads the tokenizer via init_kwargs["name_or_path"], so it must be
    # a tokenizer loaded from the saved directory (an in-memory one raises KeyError).
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = TransformerLensReplacementModel(cfg, tokenizer=tok, default_padding_side="right")
    sd = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model._configure_replacement_model(transcoders)
    return model


def build_replacement(backend, model_dir, hf_model, tok, tc_dir):
    from circuit_tracer import ReplacementModel

    transcoders, _ = load_transcoders_local(tc_dir)
    if backend == "nnsight":
        return ReplacementModel.from_pretrained_and_transcoders(
            model_dir, transcoders, backend="nnsight", device=torch.device("cpu"),
            dtype=torch.float32,
        )
    return build_tl_model(model_dir, hf_model, tok, transcoders)


def run_graph(model, tokens, args, hf_model, out_path):
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    graph = attribute(tokens, model, max_n_logits=args.max_logits,
                      desired_logit_prob=args.logit_prob, batch_size=args.batch_size,
                      max_feature_nodes=args.max_feature_nodes, verbose=False)
    node_mask, edge_mask, cum = prune_graph(graph, 0.8, 0.98)
    rep, comp = compute_graph_scores(graph)
    input_ids = graph.input_tokens.cpu().long()
    with torch.no_grad():
        logits = hf_model(input_ids[None]).logits[0].float()
    arrs = dict(
        input_ids=input_ids.numpy(),
        active_features=graph.active_features.cpu().numpy(),
        activation_values=graph.activation_values.detach().float().cpu().numpy(),
        selected_features=graph.selected_features.cpu().numpy(),
        logit_token_ids=graph.logit_token_ids.cpu().numpy(),
        logit_probabilities=graph.logit_probabilities.float().cpu().numpy(),
        adjacency=graph.adjacency_matrix.float().cpu().numpy(),
        node_mask=node_mask.cpu().numpy(),
        edge_mask=edge_mask.cpu().numpy(),
        cumulative_scores=cum.float().cpu().numpy(),
        replacement_score=np.float64(rep),
        completeness_score=np.float64(comp),
        logits=logits.numpy(),
        n_layers=np.int64(N_LAYERS),
    )
    np.savez(out_path, **arrs)
    return arrs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="5,9,4,12,7")
    ap.add_argument("--max-logits", type=int, default=10)
    ap.add_argument("--logit-prob", type=float, default=0.95)
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--backend", choices=["nnsight", "transformerlens"], default="nnsight")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    tokens = [int(t) for t in args.tokens.split(",")]

    model_dir, hf_model, tok = build_model(out, args.tie_embeddings)
    set_dir, clt_dir = write_transcoders(out, hf_model)

    summary = {}
    for name, tc_dir in [("set", set_dir), ("clt", clt_dir)]:
        rm = build_replacement(args.backend, model_dir, hf_model, tok, tc_dir)
        arrs = run_graph(rm, tokens, args, hf_model, os.path.join(out, f"{name}_graph.npz"))
        af = arrs["active_features"]
        n_pos = len(arrs["input_ids"])
        summary[name] = {
            "input_ids": arrs["input_ids"].tolist(),
            "shapes": {k: "x".join(map(str, np.shape(v))) or "scalar" for k, v in arrs.items()},
            "n_active": int(af.shape[0]),
            "fire_frac_per_token(excl pos0)": round(af.shape[0] / (N_LAYERS * F * (n_pos - 1)), 3),
            "n_selected": int(arrs["selected_features"].shape[0]),
            "logit_token_ids": arrs["logit_token_ids"].tolist(),
            "nodes_kept": int(arrs["node_mask"].sum()),
            "edges_kept": int(arrs["edge_mask"].sum()),
            "replacement_score": float(arrs["replacement_score"]),
            "completeness_score": float(arrs["completeness_score"]),
        }
        del rm
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
