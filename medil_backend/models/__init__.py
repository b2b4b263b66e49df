"""Models: the architecture registry (network + runner per architecture) and model cards (bundled and installed weights)."""

from .cards import (
    BUNDLED_DIR,
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    LoadedModel,
    ModelEntry,
    build_network,
    default_model_for,
    export_model,
    find_model,
    latent_space_ref,
    list_models,
    load_model,
    same_latent_space,
    sha256_file,
    user_model_dirs,
)
from .registry import Architecture, architecture_of, architectures, get_architecture, register, run_model

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_MODEL",
    "DEFAULT_MODELS",
    "Architecture",
    "LoadedModel",
    "ModelEntry",
    "architecture_of",
    "architectures",
    "build_network",
    "default_model_for",
    "export_model",
    "find_model",
    "get_architecture",
    "latent_space_ref",
    "list_models",
    "load_model",
    "register",
    "run_model",
    "same_latent_space",
    "sha256_file",
    "user_model_dirs",
]
