"""Hook names of the PyTorch world's dictionary formats and the sites they mean, in one table.

Three naming schemes meet here:

- TransformerLens hook names (SAELens' `hook_name`, Llama Scope's `hook_point_in`, circuit-tracer):
  `blocks.8.hook_resid_post`, `blocks.8.ln2.hook_normalized`, `hook_embed`;
- module paths of a transformers model (sparsify's hookpoints, Gemma Scope 2's `hf_hook_point_in`):
  `layers.8`, `layers.8.mlp`, `model.layers.8.post_feedforward_layernorm.output`; a module's
  output unless the path ends in `.input` or a transcoder reads the module's input;
- our sites: `embed`, `blocks.{i}.{point}`, `final` (`models.intercept`).

`site_for_hook` reads any of them; `hook_for_site` writes TransformerLens names (SAELens exports).
"""

from __future__ import annotations

import re

from jaxinterp.errors import JaxinterpError


class HookNameError(JaxinterpError):
    """A hook name no site corresponds to."""


TRANSFORMER_LENS: tuple[tuple[str, str], ...] = (
    # (TransformerLens hook, our point): the first entry of a point is the one written
    ("hook_resid_pre", "resid_pre"),
    ("hook_attn_out", "attn_out"),
    ("hook_resid_mid", "resid_mid"),
    ("hook_mlp_in", "mlp_in"),  # as SAELens names a transcoder's input (Gemma Scope 2)
    ("ln2.hook_normalized", "mlp_in"),
    ("mlp.hook_in", "mlp_in"),  # circuit-tracer
    ("hook_mlp_out", "mlp_out"),
    ("mlp.hook_out", "mlp_out"),
    ("hook_resid_post", "resid_post"),
)
"""Per-block TransformerLens hooks (`blocks.{i}.<hook>`) and the point each is."""

TRANSFORMER_LENS_GLOBAL = {"hook_embed": "embed", "ln_final.hook_normalized": "final"}

MODULES: tuple[tuple[str, str, str | None], ...] = (
    # (module path below a layer, point of its output, point of its input)
    ("", "resid_post", "resid_pre"),
    ("mlp", "mlp_out", "mlp_in"),
    ("self_attn", "attn_out", None),
    ("attn", "attn_out", None),
    ("attention", "attn_out", None),
    ("post_feedforward_layernorm", "mlp_out", None),  # Gemma 2/3: the normalised MLP output
    ("pre_feedforward_layernorm", "mlp_in", None),  # Gemma 2/3
    ("post_attention_layernorm", None, None),  # Llama: the MLP's norm; Gemma: the attention's
)
"""Modules of a transformers decoder layer (`[model.]layers.{i}.<module>`) and the points their output
and input are (None: no site holds it)."""

_MODEL_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|model\.|transformer\.|gpt_neox\.)")
_LAYER = re.compile(r"^(?:layers|h|blocks)[._](\d+)(?:\.(.+))?$")
_ATTN_Z = ("attn.hook_z", "self_attn.o_proj.input", "attn.hook_result")


def _known() -> str:
    return ("TransformerLens names blocks.{i}.{" + ",".join(h for h, _ in TRANSFORMER_LENS) + "}, hook_embed, "
            "ln_final.hook_normalized; module paths [model.]layers.{i}[.mlp|.self_attn][.input|.output]; or our "
            "sites embed, final, blocks.{i}.{point}")


def site_for_hook(name: str, *, reads_input: bool = False) -> str:
    """Our site for a hook name of any scheme above. `reads_input`: a module path names the module's
    input (a transcoder's hookpoint in sparsify is the module it replaces)."""
    from jaxinterp.models.intercept import POINTS

    name = str(name).strip()
    if name in ("embed", "final"):
        return name
    if name in TRANSFORMER_LENS_GLOBAL:
        return TRANSFORMER_LENS_GLOBAL[name]
    if name in ("embed_tokens", "model.embed_tokens", "wte", "transformer.wte"):
        return "embed"
    if name in ("norm", "model.norm", "ln_f", "transformer.ln_f"):
        return "final"
    stripped = _MODEL_PREFIX.sub("", name)
    m = _LAYER.match(stripped)
    if not m:
        raise HookNameError(f"hook {name!r} not recognised; expected {_known()}")
    layer, rest = int(m.group(1)), m.group(2) or ""
    if rest in POINTS and stripped.startswith("blocks."):
        return f"blocks.{layer}.{rest}"
    if any(rest == z or rest.startswith(z) for z in _ATTN_Z):
        raise HookNameError(f"hook {name!r} is the attention's per-head z (before the output projection), which no "
                            "site holds; attention dictionaries on attn_out (after o_proj) load")
    for hook, point in TRANSFORMER_LENS:
        if rest == hook and stripped.startswith("blocks."):
            return f"blocks.{layer}.{point}"
    module, side = rest, "input" if reads_input else "output"
    for suffix in (".input", ".output"):
        if rest.endswith(suffix) or rest == suffix[1:]:
            module, side = rest[: -len(suffix)].rstrip("."), suffix[1:]
    for path, out_point, in_point in MODULES:
        if module == path:
            point = out_point if side == "output" else in_point
            if point is None:
                raise HookNameError(f"hook {name!r}: the {side} of {path or 'the layer'} is not a site here "
                                    f"(expected {_known()})")
            return f"blocks.{layer}.{point}"
    raise HookNameError(f"hook {name!r} not recognised; expected {_known()}")


def hook_for_site(site: str | None) -> str:
    """TransformerLens' hook name for our site (`blocks.8.resid_post` -> `blocks.8.hook_resid_post`)."""
    if not site:
        return "unknown"
    if site == "embed":
        return "hook_embed"
    if site == "final":
        return "ln_final.hook_normalized"
    parts = site.split(".")
    if len(parts) == 3 and parts[0] == "blocks":
        hook = next((h for h, p in TRANSFORMER_LENS if p == parts[2]), None)
        if hook is not None:
            return f"blocks.{parts[1]}.{hook}"
    return site


def sparsify_hookpoint(site: str) -> str:
    """sparsify's hookpoint for a site it can name (`blocks.8.resid_post` -> `layers.8`,
    `blocks.8.mlp_out` and `blocks.8.mlp_in` -> `layers.8.mlp`); other sites keep their name."""
    if site == "embed":
        return "embed_tokens"
    parts = site.split(".")
    if len(parts) == 3 and parts[0] == "blocks":
        module = {"resid_post": "", "resid_pre": "", "mlp_out": "mlp", "mlp_in": "mlp", "attn_out": "self_attn"}
        if parts[2] in module:
            return ".".join(p for p in ("layers", parts[1], module[parts[2]]) if p)
    return site
