"""Model registry: DP-compatible networks by name (``privmed models``)."""

from privmed.models.registry import (
    RECOMMENDED_MODEL,
    count_parameters,
    create_model,
    list_models,
    load_model,
    load_user_model,
    make_dp_compatible,
    model_for,
    model_kwargs,
    register_model,
    save_model,
)

__all__ = ["RECOMMENDED_MODEL", "count_parameters", "create_model", "list_models", "load_model",
           "load_user_model", "make_dp_compatible", "model_for",
           "model_kwargs", "register_model", "save_model"]
