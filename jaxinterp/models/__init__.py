"""Language models with named intercept sites; loaders."""

from jaxinterp.models.decoder import Decoder, DecoderConfig, ForwardResult, forward, load_weights
from jaxinterp.models.intercept import POINTS, Plan, SiteError, parse_site, site_names
from jaxinterp.models.registry import REGISTRY, load_gguf_model, load_model

__all__ = ["POINTS", "REGISTRY", "Decoder", "DecoderConfig", "ForwardResult", "Plan", "SiteError", "forward",
           "load_gguf_model", "load_model", "load_weights", "parse_site", "site_names"]
