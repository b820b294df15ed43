"""Models: loading and fetching (`loading`), one adapter entry per family (`families`), target shapes (`shape`),
the shape search under a parameter budget (`shape_search`), model cards of exported folders (`card`)."""

from drpruning.models.families import FAMILIES, SUPPORTED, Family, family_of
from drpruning.models.loading import (
    KNOWN_MODELS,
    SUPPORTED_ARCHITECTURES,
    ModelSourceError,
    cache_root,
    check_config,
    fetch_model,
    load_model,
    load_model_config,
    model_max_length,
    resolve_model_source,
    separator_token_id,
)
from drpruning.models.shape import Shape, parameter_count, resolve_target, source_shape

__all__ = ["FAMILIES", "SUPPORTED", "Family", "family_of", "KNOWN_MODELS", "SUPPORTED_ARCHITECTURES",
           "ModelSourceError", "cache_root", "check_config", "fetch_model", "load_model", "load_model_config",
           "model_max_length", "resolve_model_source", "separator_token_id", "Shape", "parameter_count",
           "resolve_target", "source_shape"]
