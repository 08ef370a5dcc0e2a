"""Sparse dictionaries as pure functions over parameter dicts, and their artifacts on disk."""

from jaxinterp.dictionaries.artifact import (CLTDictionary, Dictionary, DictionaryError, load_dictionary,
                                             load_site_dictionary, save)
from jaxinterp.dictionaries.activations import heaviside_ste, jumprelu_ste
from jaxinterp.dictionaries.kinds import (
    ACTIVATIONS,
    ARCHITECTURES,
    PARAM_AXES,
    Activation,
    Architecture,
    activation,
    architecture,
    from_saelens_architecture,
    saelens_name,
)
from jaxinterp.dictionaries.ops import kth_largest, topk
from jaxinterp.dictionaries.sae import (
    AdaptiveOutput,
    AdaptiveRule,
    adaptive_reconstruct,
    AUX_K_ROW_STRIDE,
    DictionarySpec,
    ForwardOutput,
    LossTerms,
    LossWeights,
    Params,
    aux_k_loss,
    aux_k_pool,
    clamp_params,
    decode,
    decode_prefixes,
    decode_selected,
    decode_sparse,
    encode,
    encode_selected,
    fit_to_data,
    resample,
    update_buffers,
    typical_rows,
    replace_outliers,
    forward,
    has_aux_k,
    init,
    normalise_decoder,
    project_decoder_grad,
    reconstruct,
    selects_k,
    skip_out,
    sparsity_penalty,
    split,
    split_params,
    target_scale,
)
from jaxinterp.dictionaries.sparse import (
    scatter_dense,
    topk_decode,
    topk_decode_reference,
    topk_encode,
    topk_encode_reference,
)

__all__ = [
    "AdaptiveOutput", "AdaptiveRule", "adaptive_reconstruct",
    "CLTDictionary", "Dictionary", "DictionaryError", "load_dictionary", "load_site_dictionary", "save",
    "DictionarySpec", "ForwardOutput", "LossTerms", "LossWeights", "Params",
    "ACTIVATIONS", "ARCHITECTURES", "PARAM_AXES", "Activation", "Architecture", "activation", "architecture", "skip_out", "split", "decode_prefixes", "decode_selected", "decode_sparse", "fit_to_data", "resample", "update_buffers", "typical_rows", "replace_outliers", "target_scale", "from_saelens_architecture", "saelens_name", "encode_selected", "AUX_K_ROW_STRIDE", "aux_k_loss", "aux_k_pool", "clamp_params", "decode", "encode", "forward", "has_aux_k", "init", "normalise_decoder", "project_decoder_grad",
    "reconstruct", "selects_k", "sparsity_penalty", "split_params", "heaviside_ste", "jumprelu_ste", "kth_largest", "topk",
    "scatter_dense", "topk_decode", "topk_decode_reference", "topk_encode", "topk_encode_reference",
]
