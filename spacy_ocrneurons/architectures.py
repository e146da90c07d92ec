"""Find decoder layers and MLP modules in a given architecture.

This module knows *where* things live in a model; the profile (``profile.py``) says *what* to change.
Supported: Llama and Mistral (the paper's two families) and any decoder with the same gated MLP
(``mlp.up_proj`` / ``mlp.gate_proj`` / ``mlp.down_proj``) under ``model.layers``, e.g. Qwen2.
"""
from typing import Any, Dict, List

#: Architectures tested in this package. Others with the same module names work but get a warning-free pass.
TESTED_ARCHITECTURES = (
    "LlamaForTokenClassification",
    "MistralForTokenClassification",
    "Qwen2ForTokenClassification",
)

#: MLP sites a profile may target, and the MLP projection whose output they scale.
SITES = {
    "mlp.up_proj": "up_proj",
    "mlp.gate_proj": "gate_proj",
}


class UnsupportedArchitectureError(ValueError):
    """The model has no decoder layers with a gated MLP (``mlp.up_proj/gate_proj/down_proj``)."""


def unwrap_model(model: Any) -> Any:
    """Return the underlying transformers model of a peft ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model


def decoder_layers(model: Any) -> List[Any]:
    """The model's decoder layers (a ``ModuleList``), each with a gated ``mlp``.

    Raises UnsupportedArchitectureError naming the architecture when none are found.
    """
    base = unwrap_model(model)
    candidates = [base]
    for attr in ("model", "transformer", "decoder"):
        inner = getattr(base, attr, None)
        if inner is not None:
            candidates.append(inner)
    for cand in candidates:
        layers = getattr(cand, "layers", None)
        if layers is not None and len(layers) > 0 and all(_has_gated_mlp(layer) for layer in layers):
            return layers
    arch = _architecture_name(base)
    raise UnsupportedArchitectureError(
        f"Unsupported architecture {arch!r}: spacy-ocrneurons needs decoder layers at `model.layers` whose "
        f"`mlp` has `up_proj`, `gate_proj` and `down_proj` (Llama, Mistral, Qwen2, ...). "
        f"Tested: {', '.join(TESTED_ARCHITECTURES)}."
    )


def _has_gated_mlp(layer: Any) -> bool:
    mlp = getattr(layer, "mlp", None)
    return mlp is not None and all(hasattr(mlp, n) for n in ("up_proj", "gate_proj", "down_proj"))


def _architecture_name(model: Any) -> str:
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else type(model).__name__


def mlp_projection(model: Any, layer: int, name: str) -> Any:
    """The MLP projection module ``name`` (``up_proj``, ``gate_proj`` or ``down_proj``) of decoder layer ``layer``."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"Layer {layer} out of range: the model has {len(layers)} decoder layers.")
    return getattr(layers[layer].mlp, name)


def site_module(model: Any, layer: int, site: str) -> Any:
    """The module whose *output* a profile site scales (e.g. ``mlp.up_proj``)."""
    if site not in SITES:
        raise ValueError(f"Unknown site {site!r}; valid sites: {sorted(SITES)}")
    return mlp_projection(model, layer, SITES[site])


def model_shape(model: Any) -> Dict[str, Any]:
    """The facts a profile is checked against: architecture, layer count, MLP width, hidden size, name."""
    base = unwrap_model(model)
    layers = decoder_layers(base)
    up = layers[0].mlp.up_proj
    up = getattr(up, "base_layer", up)  # peft LoRA wrapper
    config = getattr(base, "config", None)
    return {
        "architecture": _architecture_name(base),
        "num_hidden_layers": len(layers),
        "intermediate_size": int(up.weight.shape[0]),
        "hidden_size": int(up.weight.shape[1]),
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
    }
