"""Neutralization profiles: which MLP neurons, per decoder layer, to scale and by what factor.

A profile is a saveable intervention spec (JSON, ``format = "spacy-ocrneurons/profile"``, version 1)::

    {"format": "spacy-ocrneurons/profile", "version": 1,
     "model": {"architecture": "MistralForTokenClassification", "num_hidden_layers": 32,
               "intermediate_size": 14336, "hidden_size": 4096, "name_or_path": "..."},
     "site": "mlp.up_proj", "factor": 0.5,
     "neurons": {"2": [17, 455, 9031], "3": [12]},
     "provenance": {"method": "...", "data": "...", "noise": "...", "created": "..."}}

Two ways to apply it:

* :meth:`NeutralizationProfile.fold` scales weights in place. Scaling channel ``j`` of ``up_proj``'s output
  by ``f`` equals scaling column ``j`` of ``down_proj.weight`` by ``f`` (the MLP is
  ``down(act(gate(x)) * up(x))``), so a folded profile costs nothing at inference.
* :meth:`NeutralizationProfile.apply` is a context manager that registers forward hooks on an unmerged
  model (research use: sweeps over many profiles with one loaded model) and always removes them.
"""
import contextlib
import datetime
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from .architectures import SITES, decoder_layers, model_shape

PROFILE_FORMAT = "spacy-ocrneurons/profile"
PROFILE_VERSION = 1
_KNOWN_KEYS = {"format", "version", "model", "site", "factor", "neurons", "provenance"}


class ProfileError(ValueError):
    """A profile file is malformed or does not fit the model it is applied to."""


@dataclass
class NeutralizationProfile:
    """Per-layer MLP neurons to scale by ``factor`` at inference (public API).

    ``neurons`` maps a 0-based decoder-layer index to a sorted list of unique neuron indices.
    Unknown top-level fields of a file are kept in ``extra`` and written back, so later
    additions (e.g. attention heads) survive a version-1 read/write round trip.
    """

    neurons: Dict[int, List[int]]
    factor: float = 0.5
    site: str = "mlp.up_proj"
    model: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None  # where it was loaded from, for error messages

    # ----------------------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: Optional[str] = None) -> "NeutralizationProfile":
        """Build a profile from its JSON dict, checking the format (not yet the model)."""
        where = source or "<profile>"
        if not isinstance(data, dict):
            raise ProfileError(f"Profile {where}: expected a JSON object, got {type(data).__name__}.")
        if data.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f"Profile {where}: 'format' is {data.get('format')!r}, expected {PROFILE_FORMAT!r}. "
                f"A valid profile looks like: {json.dumps(_EXAMPLE)}"
            )
        if data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"Profile {where}: unsupported 'version' {data.get('version')!r}; this reader handles version {PROFILE_VERSION}."
            )
        raw = data.get("neurons")
        if not isinstance(raw, dict):
            raise ProfileError(f"Profile {where}: 'neurons' must be an object mapping layer index strings to lists of ints.")
        neurons: Dict[int, List[int]] = {}
        for key, idx in raw.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise ProfileError(f"Profile {where}: layer key {key!r} is not a decimal layer index.") from None
            if str(layer) != str(key).strip() or layer < 0:
                raise ProfileError(f"Profile {where}: layer key {key!r} is not a 0-based decimal layer index.")
            if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                raise ProfileError(f"Profile {where}: layer {layer}: neurons must be a list of integers, got {idx!r:.80}.")
            neurons[layer] = list(idx)
        factor = data.get("factor", 0.5)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ProfileError(f"Profile {where}: 'factor' must be a number, got {factor!r}.")
        profile = cls(
            neurons=neurons,
            factor=float(factor),
            site=data.get("site", "mlp.up_proj"),
            model=dict(data.get("model") or {}),
            provenance=dict(data.get("provenance") or {}),
            extra={k: v for k, v in data.items() if k not in _KNOWN_KEYS},
            source=source,
        )
        profile.check()
        return profile

    @classmethod
    def load(cls, path: Union[str, Path]) -> "NeutralizationProfile":
        """Read a profile JSON file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Neutralization profile not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf8"))
        except json.JSONDecodeError as err:
            raise ProfileError(f"Profile {path}: not valid JSON ({err}).") from None
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        """The JSON-ready dict (layer keys as decimal strings, in numeric order)."""
        data: Dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "model": dict(self.model),
            "site": self.site,
            "factor": self.factor,
            "neurons": {str(layer): sorted(self.neurons[layer]) for layer in sorted(self.neurons)},
            "provenance": dict(self.provenance),
        }
        data.update(self.extra)
        return data

    def save(self, path: Union[str, Path]) -> Path:
        """Write the profile as JSON (one layer per line, readable in a diff)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        neurons = data.pop("neurons")
        head = json.dumps(data, indent=2, ensure_ascii=False)
        body = ",\n".join(f'    "{k}": {json.dumps(v)}' for k, v in neurons.items())
        text = head[:-2] + ',\n  "neurons": {\n' + body + ("\n  }\n}\n" if body else "}\n}\n")
        path.write_text(text, encoding="utf8")
        json.loads(text)  # never write a file we cannot read back
        return path

    # ------------------------------------------------------------------------------ checks
    @property
    def name(self) -> str:
        return self.source or "<in-memory profile>"

    @property
    def num_neurons(self) -> int:
        """Total number of neurons over all layers."""
        return sum(len(v) for v in self.neurons.values())

    def check(self, factor: Optional[float] = None) -> None:
        """Model-independent checks: site known, factor >= 0, indices non-negative and unique."""
        if self.site not in SITES:
            raise ProfileError(f"Profile {self.name}: unknown site {self.site!r}; valid sites: {sorted(SITES)}.")
        f = self.factor if factor is None else factor
        if not f >= 0:  # also rejects NaN
            raise ProfileError(f"Profile {self.name}: factor must be >= 0, got {f!r}.")
        for layer, idx in self.neurons.items():
            if layer < 0:
                raise ProfileError(f"Profile {self.name}: layer {layer} is negative.")
            seen = set()
            for i in idx:
                if i < 0:
                    raise ProfileError(f"Profile {self.name}: layer {layer}: neuron index {i} is negative.")
                if i in seen:
                    raise ProfileError(f"Profile {self.name}: layer {layer}: neuron index {i} is listed twice.")
                seen.add(i)

    def validate(self, model: Any, factor: Optional[float] = None) -> None:
        """Check the profile against ``model``: layer count, MLP width, indices in range, unique, factor >= 0.

        Raises ProfileError naming the profile, the layer and the offending value.
        """
        self.check(factor)
        shape = model_shape(model)
        n_layers, width = shape["num_hidden_layers"], shape["intermediate_size"]
        declared = self.model
        for key, actual in (("num_hidden_layers", n_layers), ("intermediate_size", width)):
            if key in declared and declared[key] is not None and int(declared[key]) != actual:
                raise ProfileError(
                    f"Profile {self.name} was made for a model with {key}={declared[key]}, "
                    f"but the model has {key}={actual} ({shape['architecture']})."
                )
        for layer, idx in sorted(self.neurons.items()):
            if layer >= n_layers:
                raise ProfileError(
                    f"Profile {self.name}: layer {layer} does not exist; the model has {n_layers} decoder layers (0-{n_layers - 1})."
                )
            bad = [i for i in idx if i >= width]
            if bad:
                raise ProfileError(
                    f"Profile {self.name}: layer {layer}: neuron index {bad[0]} is out of range for MLP width {width}."
                )

    # ------------------------------------------------------------------------- intervention
    def _scales(self, factor: Optional[float]) -> float:
        f = self.factor if factor is None else float(factor)
        self.check(f)
        return f

    def fold(self, model: Any, factor: Optional[float] = None) -> None:
        """Fold the scaling into the weights, in place (merge LoRA adapters first for zero-cost inference).

        ``mlp.up_proj``: columns of ``down_proj`` (and of an unmerged LoRA's ``lora_A`` on it).
        ``mlp.gate_proj``: rows of ``gate_proj`` (and of an unmerged LoRA's ``lora_B`` on it, plus bias).
        """
        import torch

        f = self._scales(factor)
        self.validate(model, f)
        layers = decoder_layers(model)
        with torch.no_grad():
            for layer, idx in self.neurons.items():
                if not idx:
                    continue
                mlp = layers[layer].mlp
                if self.site == "mlp.up_proj":
                    down = mlp.down_proj
                    weights = [getattr(down, "base_layer", down).weight]
                    weights += [m.weight for m in _lora_parts(down, "lora_A")]
                    for w in weights:
                        cols = torch.as_tensor(idx, device=w.device)
                        w[:, cols] *= f
                else:  # mlp.gate_proj: scale the output rows of gate_proj
                    gate = mlp.gate_proj
                    base = getattr(gate, "base_layer", gate)
                    params = [base.weight] + [m.weight for m in _lora_parts(gate, "lora_B")]
                    if getattr(base, "bias", None) is not None:
                        params.append(base.bias)
                    for w in params:
                        rows = torch.as_tensor(idx, device=w.device)
                        w[rows] *= f

    @contextlib.contextmanager
    def apply(self, model: Any, factor: Optional[float] = None) -> Iterator["NeutralizationProfile"]:
        """Scale the profile's neurons with forward hooks while the ``with`` block runs; hooks are always removed."""
        import torch

        f = self._scales(factor)
        self.validate(model, f)
        layers = decoder_layers(model)
        proj = SITES[self.site]
        handles = []
        try:
            for layer, idx in self.neurons.items():
                if not idx:
                    continue
                module = getattr(layers[layer].mlp, proj)
                index = torch.as_tensor(sorted(idx), dtype=torch.long)
                handles.append(module.register_forward_hook(_ScaleHook(index, f)))
            yield self
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------------------ controls
    def random_control(self, intermediate_size: Optional[int] = None, seed: int = 0,
                       exclude_identified: bool = True) -> "NeutralizationProfile":
        """A random-neuron control: same layers, same counts per layer, same factor and site.

        Neurons are drawn uniformly (seeded) among the layer's neurons, by default excluding the identified ones.
        """
        width = intermediate_size or self.model.get("intermediate_size")
        if not width:
            raise ProfileError(f"Profile {self.name}: intermediate_size is unknown; pass it to random_control().")
        rng = random.Random(seed)
        neurons = {}
        for layer in sorted(self.neurons):
            taken = set(self.neurons[layer]) if exclude_identified else set()
            pool = [i for i in range(width) if i not in taken]
            k = len(self.neurons[layer])
            if k > len(pool):
                pool = list(range(width))
            neurons[layer] = sorted(rng.sample(pool, k))
        prov = dict(self.provenance)
        prov.update({"method": "random-control", "control_of": self.provenance.get("method", self.name),
                     "seed": seed, "created": _now()})
        return NeutralizationProfile(neurons=neurons, factor=self.factor, site=self.site,
                                     model=dict(self.model), provenance=prov, extra=dict(self.extra))


class _ScaleHook:
    """Forward hook multiplying the selected output channels by a factor (out of place, autograd-safe)."""

    def __init__(self, index, factor: float):
        self.index = index
        self.factor = factor

    def __call__(self, module, inputs, output):
        index = self.index.to(output.device)
        scale = output.new_ones(output.shape[-1])
        scale[index] = self.factor
        return output * scale


def _lora_parts(module: Any, name: str) -> List[Any]:
    parts = getattr(module, name, None)
    if parts is None:
        return []
    return list(parts.values()) if hasattr(parts, "values") else [parts]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


_EXAMPLE = {
    "format": PROFILE_FORMAT,
    "version": PROFILE_VERSION,
    "model": {"architecture": "MistralForTokenClassification", "num_hidden_layers": 32,
              "intermediate_size": 14336, "hidden_size": 4096},
    "site": "mlp.up_proj",
    "factor": 0.5,
    "neurons": {"2": [17, 455], "3": [12]},
    "provenance": {"method": "..."},
}
