"""Language models with named intercept sites; loaders."""

from jaxinterp.models.intercept import POINTS, Plan, SiteError, parse_site, site_names
from jaxinterp.models.llama import ForwardResult, Llama, LlamaConfig, forward, load_weights
from jaxinterp.models.registry import REGISTRY, load_gguf_model, load_model

__all__ = ["POINTS", "REGISTRY", "ForwardResult", "Llama", "LlamaConfig", "Plan", "SiteError", "forward",
           "load_gguf_model", "load_model", "load_weights", "parse_site", "site_names"]
