"""Evaluation: strict entity F1 (seqeval) on clean and noisy sets, a neutralization sweep selected on dev.

The procedure (step 6 of the project plan):

1. Load the model **once** (hook-based profiles, no reload per setting) and encode each evaluation set once
   (:class:`PreparedTexts` caches word pieces, windows and padded batches across settings).
2. **Dev sweep**: for every setting ``k × factor × layer range``, build a :class:`NeutralizationProfile` in memory
   from a neuron *ranking* (top-k per layer, in rank order), apply it with forward hooks and score every dev set.
3. **Choose** the setting with the best selection score on dev (default: mean micro-F1 over the noisy dev sets).
   The choice is a frozen :class:`Choice`; nothing after this point can change it.
4. **Test report**: only now are the test files read. Baseline (no profile), neutralized (the chosen setting) and a
   random-neuron control (same layers and counts, :meth:`NeutralizationProfile.random_control`) are scored on the
   clean test set and on each noise level.

Scoring is seqeval's strict mode with the IOB2 scheme (an entity counts only when its type *and* both boundaries
match; ill-formed entities such as an ``I-x`` without a ``B-x`` count as nothing), micro-averaged over entities and
per type. The evaluation unit is a HIPE *document* by default (``unit="document"``: one text per document, windowed
over word pieces, as the spaCy component sees it); ``unit="segment"`` or ``"sentence"`` split it further. Entities
never cross units, so scores are the same whichever way the gold is grouped.

Outputs: ``results.json`` (dev sweep, chosen setting, test table), ``results.md`` (tables), HIPE TSV predictions
``predictions/<split>-<noise>-<system>.tsv`` that the official HIPE scorer re-scores
(``clef_evaluation.py --ref GOLD.tsv --pred PRED.tsv --task nerc_coarse --skip-check``), the chosen profile and one
F1-vs-k plot per factor.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .hipe import doc_bio_tags

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

RESULTS_FORMAT = "spacy-ocrneurons/results"
SYSTEM_SCORES_FORMAT = "spacy-ocrneurons/system-scores"
RANKING_FORMAT = "spacy-ocrneurons/ranking"
DEFAULT_FACTORS: Tuple[float, ...] = (0.1, 0.5, 0.9)
DEFAULT_COLUMN = "NE-COARSE-LIT"
CLEAN = "clean"
#: systems reported on test, in table order: (row name in tables, file-name slug)
SYSTEMS: Tuple[Tuple[str, str], ...] = (("baseline", "baseline"), ("neutralized", "neutralized"),
                                        ("random control", "random-control"))


# ============================================================================================
# scoring
# ============================================================================================


def score_tags(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> Dict[str, Any]:
    """Strict entity scores (seqeval, ``mode="strict"``, IOB2) of predicted vs gold tag sequences.

    Returns ``{"precision", "recall", "f1", "n_gold", "n_pred", "n_correct", "per_type": {type: {"precision",
    "recall", "f1", "support", "n_pred"}}}`` (micro averages over entities; floats in [0, 1]).
    """
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2, Entities

    gold = [list(s) for s in gold]
    pred = [list(s) for s in pred]
    if len(gold) != len(pred):
        raise ValueError(f"score_tags: {len(gold)} gold sequences but {len(pred)} predicted ones.")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"score_tags: sequence {i} has {len(g)} gold tags but {len(p)} predicted tags.")
    gold_ents = {e.to_tuple() for e in _entities(Entities, gold, IOB2)}
    pred_ents = {e.to_tuple() for e in _entities(Entities, pred, IOB2)}
    n_gold, n_pred = len(gold_ents), len(pred_ents)
    n_correct = len(gold_ents & pred_ents)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_type: Dict[str, Dict[str, float]] = {}
    if n_gold or n_pred:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
        for label, row in report.items():
            if label.endswith(" avg"):
                continue
            per_type[label] = {
                "precision": float(row["precision"]),
                "recall": float(row["recall"]),
                "f1": float(row["f1-score"]),
                "support": int(row["support"]),
                "n_pred": sum(1 for e in pred_ents if e[1] == label),
            }
        micro = report.get("micro avg")
        if micro is not None:  # same numbers, computed by seqeval itself
            assert math.isclose(float(micro["f1-score"]), f1, abs_tol=1e-9), (micro, f1)
    return {"precision": precision, "recall": recall, "f1": f1, "n_gold": n_gold, "n_pred": n_pred,
            "n_correct": n_correct, "per_type": dict(sorted(per_type.items()))}


def _entities(entities_cls: Any, seqs: List[List[str]], scheme: Any) -> List[Any]:
    if not any(seqs):
        return []
    return [e for sent in entities_cls(seqs, scheme, suffix=False).entities for e in sent]


def tags_from_token_predictions(token_tags: Sequence[Tuple[Optional[str], float]]) -> List[str]:
    """IOB2 tags from ``modeling.tag_texts`` output for one text (decoded and repaired with ``decode_bio``)."""
    from .alignment import decode_bio
    from .hipe import spans_to_bio

    return spans_to_bio(len(token_tags), decode_bio([t for t, _ in token_tags]))


# ============================================================================================
# evaluation sets
# ============================================================================================


@dataclass
class EvalSet:
    """One evaluation file (a split at one noise level) as spaCy Docs with gold ``ents`` and HIPE info."""

    name: str  # noise level name, e.g. "clean", "low", "medium", "high"
    split: str  # "dev" or "test"
    path: Optional[Path]
    docs: List[Any]
    column: str = DEFAULT_COLUMN
    _gold: Optional[List[List[str]]] = field(default=None, repr=False)

    @property
    def gold(self) -> List[List[str]]:
        """Gold IOB2 tags per unit (computed once)."""
        if self._gold is None:
            self._gold = [doc_bio_tags(d) for d in self.docs]
        return self._gold

    @property
    def items(self) -> List[Tuple[str, List[Tuple[int, int]]]]:
        """``(text, token_spans)`` per unit, the input of ``modeling.tag_texts``."""
        from .alignment import token_char_spans

        return [(d.text, token_char_spans(d)) for d in self.docs]

    @property
    def n_tokens(self) -> int:
        return sum(len(d) for d in self.docs)


def load_eval_set(path: PathLike, name: str, split: str, unit: str = "document", column: str = DEFAULT_COLUMN,
                  vocab: Any = None) -> EvalSet:
    """Read a HIPE TSV (gold from ``column``) or a spaCy DocBin (gold = ``doc.ents``) as an :class:`EvalSet`."""
    from . import hipe

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{split} set {name!r}: file not found: {path}")
    if path.suffix == ".spacy":
        docs = hipe.read_docbin(path)
        if vocab is not None:
            docs = [_copy_doc(d, vocab, keep_ents=True) for d in docs]
    else:
        docs = hipe.hipe_to_docs(hipe.read_hipe_tsv(path), vocab, column=column, split=unit)
    if not docs:
        raise ValueError(f"{split} set {name!r}: {path} holds no documents.")
    return EvalSet(name=name, split=split, path=path, docs=docs, column=column)


def load_eval_sets(paths: Mapping[str, PathLike], split: str, unit: str = "document", column: str = DEFAULT_COLUMN,
                   vocab: Any = None) -> Dict[str, EvalSet]:
    """:func:`load_eval_set` for each ``{noise_name: path}`` (order kept)."""
    return {name: load_eval_set(p, name, split, unit, column, vocab) for name, p in paths.items()}


def parse_named_paths(values: Iterable[str], option: str = "--dev") -> Dict[str, Path]:
    """``["clean=a.tsv", "medium=b.tsv"]`` → ``{"clean": Path("a.tsv"), ...}``; a bare path is named ``clean``."""
    out: Dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = CLEAN, value
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"{option} {value!r}: expected NAME=PATH, e.g. {option} medium=corpus/dev-noise-medium.tsv")
        if not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"{option} {value!r}: the name {name!r} may only hold letters, digits, '.', '+', '-', '_'.")
        if name in out:
            raise ValueError(f"{option}: the name {name!r} is given twice.")
        out[name] = Path(path)
    return out


# ============================================================================================
# cached tagging (one encoding per set, many settings)
# ============================================================================================


class PreparedTexts:
    """Word pieces, windows and padded batches of a list of ``(text, token_spans)``, built once.

    :meth:`tag` gives exactly what ``modeling.tag_texts`` gives for the same items (same windows, same batching),
    but runs only the forward passes, so a sweep over many profiles pays for tokenization once.
    """

    def __init__(self, loaded: Any, items: Sequence[Tuple[str, Sequence[Tuple[int, int]]]], *, max_length: int = 512,
                 stride: int = 64, batch_size: int = 4096):
        from .modeling import encode_windows, padded_batches

        self.encodings, windows = encode_windows(loaded.tokenizer, items, max_length, stride)
        self.batches = list(padded_batches(loaded, windows, batch_size))

    def tag(self, loaded: Any) -> List[List[Tuple[Optional[str], float]]]:
        """Per-token ``(tag, probability)`` per text (``tag`` None for a token without a piece of its own)."""
        import torch

        from .modeling import PiecePredictions, forward_logits

        predictions = PiecePredictions(self.encodings)
        with torch.inference_mode():
            for rows, ids, mask in self.batches:
                predictions.add(rows, forward_logits(loaded, ids, mask))
        return predictions.token_tags(loaded.labels)

    def predict_bio(self, loaded: Any) -> List[List[str]]:
        """Decoded IOB2 tags per text."""
        return [tags_from_token_predictions(t) for t in self.tag(loaded)]


# ============================================================================================
# neuron rankings and the sweep grid
# ============================================================================================


@dataclass
class NeuronRanking:
    """Per-layer neurons in *rank order* (most OCR-sensitive first); top-k = the first k of each layer.

    ``ranked=False`` means the lists are unordered sets (a plain profile file): then only ``k`` equal to the list
    sizes is meaningful, and :meth:`top_k` refuses a smaller k.
    """

    order: Dict[int, List[int]]
    site: str = "mlp.up_proj"
    model: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    ranked: bool = True
    source: Optional[str] = None

    def top_k(self, k: int, layers: Sequence[int]) -> Dict[int, List[int]]:
        """The first ``k`` neurons of each of ``layers`` (layers missing from the ranking are left out)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        out = {}
        for layer in layers:
            ranked = self.order.get(layer)
            if not ranked:
                continue
            if not self.ranked and k < len(ranked):
                raise ValueError(
                    f"{self.source or 'profile'}: layer {layer} holds an unordered set of {len(ranked)} neurons "
                    f"(profile files are sorted by index), so its top {k} is undefined. Pass a ranking file "
                    f"(format {RANKING_FORMAT!r}, written by `ocrneurons identify`) or one profile per k."
                )
            out[layer] = list(ranked[:k])
        return out

    @property
    def max_k(self) -> int:
        return max((len(v) for v in self.order.values()), default=0)

    def save(self, path: PathLike) -> Path:
        """Write the ranking as JSON (``format "spacy-ocrneurons/ranking"``), readable by :func:`load_ranking`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": RANKING_FORMAT, "version": 1, "site": self.site, "model": self.model,
                "provenance": self.provenance,
                "ranking": {str(l): self.order[l] for l in sorted(self.order)}}
        path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf8")
        return path


@dataclass
class ProfileSet:
    """One profile file per k (e.g. ``profiles/<name>-k<K>.json``): top-k = that profile's neurons."""

    profiles: Dict[int, Any]  # k -> NeutralizationProfile

    @property
    def site(self) -> str:
        return next(iter(self.profiles.values())).site

    @property
    def model(self) -> Dict[str, Any]:
        return dict(next(iter(self.profiles.values())).model)

    @property
    def provenance(self) -> Dict[str, Any]:
        return {"profiles": {str(k): p.source for k, p in sorted(self.profiles.items())}}

    @property
    def max_k(self) -> int:
        return max(self.profiles)

    def top_k(self, k: int, layers: Sequence[int]) -> Dict[int, List[int]]:
        if k not in self.profiles:
            raise ValueError(f"No profile with k={k}; the profile files given have k in {sorted(self.profiles)}.")
        neurons = self.profiles[k].neurons
        return {layer: list(neurons[layer]) for layer in layers if neurons.get(layer)}


def _profile_k(profile: Any) -> int:
    for key in ("k", "top_k", "k_per_layer"):
        value = profile.provenance.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return max((len(v) for v in profile.neurons.values()), default=0)


def _layer_dict(raw: Any, where: str) -> Dict[int, List[int]]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object mapping layer indices to neuron lists in rank order.")
    out = {}
    for key, value in raw.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: layer key {key!r} is not a layer index.") from None
        if isinstance(value, dict):  # e.g. {"neurons": [...], "scores": [...]}
            value = value.get("neurons", value.get("ranking"))
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise ValueError(f"{where}: layer {layer}: expected a list of neuron indices in rank order.")
        if len(set(value)) != len(value):
            raise ValueError(f"{where}: layer {layer}: a neuron is listed twice in the ranking.")
        out[layer] = list(value)
    return out


def ranking_from_stats(stats_path: PathLike, statistic: Optional[str] = None, rank_mode: Optional[str] = None,
                       site: str = "mlp.up_proj", model: Optional[Mapping[str, Any]] = None,
                       provenance: Optional[Mapping[str, Any]] = None) -> NeuronRanking:
    """The full per-layer ranking from the streaming statistics ``.npz`` that ``ocrneurons identify`` writes
    (arrays ``<mode>__<name>``; ranked with ``identify.NeuronStats.rank``: most sensitive first, ties by index)."""
    import numpy as np

    from .identify import NeuronStats

    stats_path = Path(stats_path)
    if not stats_path.exists():
        raise FileNotFoundError(f"Identification statistics not found: {stats_path}")
    with np.load(stats_path) as data:
        arrays = {k: data[k] for k in data.files}
    modes = sorted({k.split("__", 1)[0] for k in arrays if "__" in k and k.endswith("__layers")})
    if rank_mode is None:
        rank_mode = "context" if "context" in modes else (modes[0] if modes else "")
    prefix = f"{rank_mode}__" if rank_mode else ""
    if prefix + "layers" not in arrays:
        raise ValueError(f"{stats_path}: no statistics for mode {rank_mode!r} (modes in the file: {modes}).")
    stats = NeuronStats.from_dict(arrays, prefix=prefix)
    statistic = statistic or "mean_abs_diff"
    order = {layer: [int(i) for i in stats.rank(layer, statistic)] for layer in stats.layers}
    prov = dict(provenance or {})
    prov.update({"stats": str(stats_path), "statistic": statistic, "rank_mode": rank_mode})
    return NeuronRanking(order=order, site=site, model=dict(model or {}), provenance=prov, source=str(stats_path))


def load_ranking(paths: Union[PathLike, Sequence[PathLike]], statistic: Optional[str] = None,
                 rank_mode: Optional[str] = None) -> Union[NeuronRanking, ProfileSet]:
    """Load the neuron source of a sweep.

    * the summary JSON of ``ocrneurons identify`` (``format "spacy-ocrneurons/identify"``, with a ``stats`` path)
      or its statistics ``.npz``: the full ranking per layer, by the summary's statistic and rank mode unless
      ``statistic`` / ``rank_mode`` are given (see :func:`ranking_from_stats`);
    * one ranking JSON: ``{"format": "spacy-ocrneurons/ranking", "ranking": {layer: [neurons in rank order]},
      "site": ..., "model": {...}}`` (``"neurons"`` or ``"layers"`` are accepted for the mapping, or a bare
      ``{layer: [...]}`` object);
    * a profile JSON that carries a ``"ranking"`` field next to its (sorted) ``"neurons"``;
    * several profile files: one per k (k from ``provenance.k`` or the largest per-layer count); top-k is that file.
    """
    from .profile import PROFILE_FORMAT, NeutralizationProfile

    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("No ranking given: pass a ranking JSON (from `ocrneurons identify`) or profile files.")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"Ranking/profile file not found: {p}")
    if len(paths) == 1 and paths[0].suffix == ".npz":
        return ranking_from_stats(paths[0], statistic, rank_mode)
    datas = []
    for p in paths:
        try:
            datas.append(json.loads(p.read_text(encoding="utf8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}: not valid JSON ({err}).") from None
    if len(paths) == 1:
        data, where = datas[0], str(paths[0])
        if isinstance(data, dict) and data.get("format") == "spacy-ocrneurons/identify":
            if not data.get("stats"):
                raise ValueError(f"{where}: this identification summary has no 'stats' file (run `identify` with "
                                 "statistics output); pass the .npz or the per-k profile files instead.")
            stats = Path(data["stats"])
            if not stats.exists() and (paths[0].parent / stats.name).exists():
                stats = paths[0].parent / stats.name
            return ranking_from_stats(stats, statistic or data.get("statistic"), rank_mode or data.get("rank_mode"),
                                      site=data.get("site", "mlp.up_proj"), model=data.get("model"),
                                      provenance=dict(data.get("provenance") or {}, identify_summary=where))
        if isinstance(data, dict) and data.get("format") == PROFILE_FORMAT and "ranking" not in data:
            prof = NeutralizationProfile.from_dict(data, source=where)
            return ProfileSet({_profile_k(prof): prof})
        if isinstance(data, dict) and (data.get("format") in (RANKING_FORMAT, PROFILE_FORMAT) or "ranking" in data):
            raw = data.get("ranking", data.get("neurons", data.get("layers")))
            if data.get("format") == PROFILE_FORMAT:
                raw = data["ranking"]
            return NeuronRanking(order=_layer_dict(raw, where), site=data.get("site", "mlp.up_proj"),
                                 model=dict(data.get("model") or {}), provenance=dict(data.get("provenance") or {}),
                                 source=where)
        if isinstance(data, dict) and data and all(str(k).strip().isdigit() for k in data):
            return NeuronRanking(order=_layer_dict(data, where), source=where)
        raise ValueError(
            f"{where}: not a neuron ranking. Expected {{\"format\": \"{RANKING_FORMAT}\", \"ranking\": "
            "{\"0\": [neurons in rank order], ...}} or a neutralization profile."
        )
    profiles: Dict[int, Any] = {}
    for p, data in zip(paths, datas):
        prof = NeutralizationProfile.from_dict(data, source=str(p))
        k = _profile_k(prof)
        if k in profiles:
            raise ValueError(f"Profiles {profiles[k].source} and {p} both have k={k}; pass one profile per k.")
        profiles[k] = prof
    sites = {p.site for p in profiles.values()}
    if len(sites) > 1:
        raise ValueError(f"The profile files target different sites {sorted(sites)}; a sweep needs one site.")
    return ProfileSet(profiles)


def parse_layer_range(spec: str, num_layers: int) -> List[int]:
    """Layer indices of a range spec, clipped to the model's ``num_layers``.

    ``all``; ``5``; ``0-3`` (inclusive); ``25-`` (25 to the last layer); ``last4`` (the last 4 layers);
    unions with ``+`` (``0-3+25-31``). Ranges beyond the model are clipped (possibly to nothing).
    """
    spec = spec.strip().lower()
    if not spec:
        raise ValueError("Empty layer range.")
    layers = set()
    for part in spec.split("+"):
        part = part.strip()
        if part == "all":
            layers.update(range(num_layers))
            continue
        m = re.fullmatch(r"last(\d+)", part)
        if m:
            layers.update(range(max(0, num_layers - int(m.group(1))), num_layers))
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d*))?", part)
        if not m:
            raise ValueError(f"Invalid layer range {spec!r}: use 'all', 'N', 'A-B', 'A-', 'lastN' or unions 'A-B+C-D'.")
        start = int(m.group(1))
        if m.group(2) is None:
            end = start
        elif m.group(2) == "":
            end = num_layers - 1
        else:
            end = int(m.group(2))
        if end < start:
            raise ValueError(f"Invalid layer range {part!r}: the end is before the start.")
        layers.update(i for i in range(start, end + 1) if i < num_layers)
    return sorted(layers)


def parse_k_values(spec: Union[str, Sequence[Union[int, float, str]]], width: int) -> List[int]:
    """Neuron counts per layer from ``"1,2,4"``, ``"100:11000:100"`` (start:stop:step, inclusive) or fractions of
    the MLP ``width`` (``"0.01,0.1"``). Values are clipped to ``width``; duplicates dropped; sorted."""
    parts: List[str] = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    ks = set()
    for part in parts:
        if not part:
            continue
        if ":" in part:
            bits = part.split(":")
            if len(bits) not in (2, 3) or not all(b.strip().isdigit() for b in bits):
                raise ValueError(f"Invalid k range {part!r}: use START:STOP or START:STOP:STEP (integers).")
            start, stop = int(bits[0]), int(bits[1])
            step = int(bits[2]) if len(bits) == 3 else 1
            if step < 1:
                raise ValueError(f"Invalid k range {part!r}: step must be >= 1.")
            ks.update(range(start, stop + 1, step))
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"Invalid k {part!r}: use integers, START:STOP:STEP or fractions in (0, 1).") from None
        if 0 < value < 1:
            ks.add(max(1, int(round(value * width))))
        elif value >= 1 and value == int(value):
            ks.add(int(value))
        else:
            raise ValueError(f"Invalid k {part!r}: a count must be a positive integer, a fraction must be in (0, 1).")
    clipped = sorted({min(k, width) for k in ks if k >= 1})
    if not clipped:
        raise ValueError(f"No valid k in {spec!r}.")
    return clipped


def default_k_values(width: int) -> List[int]:
    """The paper's grid (100 to 11,000 in steps of 100) for wide MLPs; powers of two up to width/2 for tiny ones."""
    if width >= 1000:
        return list(range(100, min(11000, width) + 1, 100))
    ks, k = [], 1
    while k <= max(1, width // 2):
        ks.append(k)
        k *= 2
    return ks


@dataclass(frozen=True)
class Setting:
    """One sweep point: top-``k`` neurons per layer of ``layers`` (a range spec), scaled by ``factor``."""

    k: int
    factor: float
    layers: str
    layer_indices: Tuple[int, ...]

    @property
    def label(self) -> str:
        return f"k={self.k} factor={self.factor:g} layers={self.layers}"

    def to_dict(self) -> Dict[str, Any]:
        return {"k": self.k, "factor": self.factor, "layers": self.layers, "layer_indices": list(self.layer_indices)}


def build_grid(ks: Sequence[int], factors: Sequence[float], layer_ranges: Sequence[str], num_layers: int) -> List[Setting]:
    """All settings ``k × factor × layer range``; ranges that clip to no layer, or to the layers of an earlier
    range, are dropped with a warning."""
    ranges: List[Tuple[str, Tuple[int, ...]]] = []
    seen: Dict[Tuple[int, ...], str] = {}
    for spec in layer_ranges:
        idx = tuple(parse_layer_range(spec, num_layers))
        if not idx:
            logger.warning("Layer range %r holds no layer of this %d-layer model; skipped.", spec, num_layers)
            continue
        if idx in seen:
            logger.warning("Layer range %r gives the same layers as %r on this model; skipped.", spec, seen[idx])
            continue
        seen[idx] = spec
        ranges.append((spec, idx))
    if not ranges:
        raise ValueError(f"None of the layer ranges {list(layer_ranges)} holds a layer of this {num_layers}-layer model.")
    for f in factors:
        if not f >= 0:
            raise ValueError(f"Invalid factor {f!r}: factors must be >= 0.")
    return [Setting(int(k), float(f), spec, idx) for spec, idx in ranges for f in factors for k in ks]


def make_profile(source: Union[NeuronRanking, ProfileSet], setting: Setting, model_info: Mapping[str, Any],
                 provenance: Optional[Mapping[str, Any]] = None) -> Any:
    """The in-memory :class:`NeutralizationProfile` of one sweep setting."""
    from .profile import NeutralizationProfile

    prov = {"method": "top-k of identified ranking", "k": setting.k, "layers": setting.layers}
    prov.update(provenance or {})
    return NeutralizationProfile(neurons=source.top_k(setting.k, setting.layer_indices), factor=setting.factor,
                                 site=source.site, model=dict(model_info), provenance=prov)


# ============================================================================================
# dev sweep, choice, test report
# ============================================================================================


def selection_sets(dev_names: Sequence[str], select_on: Union[str, Sequence[str], None] = "noisy") -> List[str]:
    """Dev sets whose mean F1 is the selection criterion: ``"noisy"`` (every set but ``clean``; ``clean`` when it is
    the only one), ``"all"``, or explicit names (``"clean,medium"``)."""
    names = list(dev_names)
    if select_on is None or select_on == "noisy":
        chosen = [n for n in names if n != CLEAN] or names
    elif select_on == "all":
        chosen = names
    else:
        wanted = [s.strip() for s in select_on.split(",")] if isinstance(select_on, str) else list(select_on)
        missing = [s for s in wanted if s not in names]
        if missing:
            raise ValueError(f"Selection sets {missing} are not among the dev sets {names}.")
        chosen = wanted
    if not chosen:
        raise ValueError("No dev set to select on: pass at least one --dev NAME=PATH.")
    return chosen


@dataclass
class SweepResult:
    """Dev scores of the baseline and of every setting (``rows``: setting, per-set scores, selection score)."""

    baseline: Dict[str, Dict[str, Any]]
    rows: List[Dict[str, Any]]
    select_on: List[str]
    prepared: Dict[str, PreparedTexts] = field(default_factory=dict, repr=False)  # encoded dev inputs, for reuse

    def baseline_selection_score(self) -> float:
        return mean_f1(self.baseline, self.select_on)


def mean_f1(scores: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> float:
    """Mean micro-F1 over the named sets."""
    return sum(scores[n]["f1"] for n in names) / len(names)


@dataclass(frozen=True)
class Choice:
    """The setting chosen on dev. Frozen: once made, nothing (least of all test data) changes it."""

    setting: Setting
    dev_score: float
    dev_baseline_score: float
    select_on: Tuple[str, ...]
    criterion: str = "mean micro-F1 over dev sets"

    def to_dict(self) -> Dict[str, Any]:
        out = self.setting.to_dict()
        out.update({"dev_selection_score": self.dev_score, "dev_baseline_selection_score": self.dev_baseline_score,
                    "improves_on_dev_baseline": self.dev_score > self.dev_baseline_score,
                    "selected_on": "dev", "select_on": list(self.select_on), "criterion": self.criterion})
        return out


def score_sets(loaded: Any, prepared: Mapping[str, PreparedTexts], sets: Mapping[str, EvalSet],
               profile: Any = None) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, List[List[str]]]]:
    """Score every set with ``profile`` applied through hooks (None = no intervention); returns (scores, predictions)."""
    import contextlib

    ctx = profile.apply(loaded.model) if profile is not None and profile.num_neurons else contextlib.nullcontext()
    scores, preds = {}, {}
    with ctx:
        for name, es in sets.items():
            pred = prepared[name].predict_bio(loaded)
            preds[name] = pred
            scores[name] = score_tags(es.gold, pred)
    return scores, preds


def sweep_dev(loaded: Any, source: Union[NeuronRanking, ProfileSet], dev_sets: Mapping[str, EvalSet],
              settings: Sequence[Setting], *, select_on: Union[str, Sequence[str], None] = "noisy",
              random_control_seed: Optional[int] = None, max_length: int = 512, stride: int = 64,
              batch_size: int = 4096, progress: bool = True) -> SweepResult:
    """Score the baseline and every setting on the dev sets (one loaded model, inputs encoded once).

    With ``random_control_seed`` the random-neuron control of every setting is scored too (twice the cost).
    """
    from tqdm import tqdm

    from .architectures import model_shape

    bad = [n for n, es in dev_sets.items() if es.split != "dev"]
    if bad:
        raise ValueError(f"sweep_dev got non-dev sets {bad}: selection is made on dev only.")
    names = selection_sets(list(dev_sets), select_on)
    shape = model_shape(loaded.model)
    prepared = {n: PreparedTexts(loaded, es.items, max_length=max_length, stride=stride, batch_size=batch_size)
                for n, es in dev_sets.items()}
    baseline, _ = score_sets(loaded, prepared, dev_sets)
    rows = []
    for setting in tqdm(settings, desc="dev sweep", unit="setting", disable=not progress):
        profile = make_profile(source, setting, shape)
        scores, _ = score_sets(loaded, prepared, dev_sets, profile)
        row = {"setting": setting.to_dict(), "num_neurons": profile.num_neurons, "scores": _compact(scores),
               "selection_score": mean_f1(scores, names)}
        if random_control_seed is not None:
            control = profile.random_control(shape["intermediate_size"], seed=random_control_seed)
            rscores, _ = score_sets(loaded, prepared, dev_sets, control)
            row["random_control"] = {"scores": _compact(rscores), "selection_score": mean_f1(rscores, names)}
        rows.append(row)
    return SweepResult(baseline=baseline, rows=rows, select_on=names, prepared=prepared)


def _compact(scores: Mapping[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {n: dict(s) for n, s in scores.items()}


def choose_setting(sweep: SweepResult, settings: Sequence[Setting]) -> Choice:
    """The best setting by dev selection score. Ties: fewer neurons, then the milder (larger) factor, then grid order."""
    if not sweep.rows:
        raise ValueError("The sweep has no settings to choose from.")
    by_key = {(s.k, s.factor, s.layers): s for s in settings}
    best_i = min(range(len(sweep.rows)), key=lambda i: (-sweep.rows[i]["selection_score"],
                                                       sweep.rows[i]["num_neurons"],
                                                       -sweep.rows[i]["setting"]["factor"], i))
    row = sweep.rows[best_i]
    st = row["setting"]
    return Choice(setting=by_key[(st["k"], st["factor"], st["layers"])], dev_score=row["selection_score"],
                  dev_baseline_score=sweep.baseline_selection_score(), select_on=tuple(sweep.select_on))


def report_on_test(loaded: Any, choice: Choice, chosen_profile: Any, control_profile: Any,
                   test_paths: Mapping[str, PathLike], *, unit: str = "document", column: str = DEFAULT_COLUMN,
                   max_length: int = 512, stride: int = 64, batch_size: int = 4096
                   ) -> Tuple[Dict[str, Dict[str, Dict[str, Any]]], Dict[str, EvalSet], Dict[str, Dict[str, List[List[str]]]]]:
    """Score baseline, neutralized and random control on the test sets, which are read here for the first time.

    Requires a :class:`Choice` (made on dev): there is no way to pass test scores back into the selection.
    Returns ``(scores[system][noise], test_sets, predictions[system][noise])``.
    """
    if not isinstance(choice, Choice):
        raise TypeError("report_on_test needs the Choice made on dev (choose_setting) before any test data is read.")
    if chosen_profile.factor != choice.setting.factor:
        raise ValueError("The neutralized profile does not match the chosen setting.")
    test_sets = load_eval_sets(test_paths, "test", unit=unit, column=column)
    prepared = {n: PreparedTexts(loaded, es.items, max_length=max_length, stride=stride, batch_size=batch_size)
                for n, es in test_sets.items()}
    scores: Dict[str, Dict[str, Dict[str, Any]]] = {}
    preds: Dict[str, Dict[str, List[List[str]]]] = {}
    for (system, _), profile in zip(SYSTEMS, (None, chosen_profile, control_profile)):
        scores[system], preds[system] = score_sets(loaded, prepared, test_sets, profile)
    return scores, test_sets, preds


# ============================================================================================
# predictions in HIPE TSV
# ============================================================================================


def write_predictions_tsv(eval_set: EvalSet, predictions: Sequence[Sequence[str]], path: PathLike) -> Path:
    """Write predictions as HIPE TSV the official scorer reads next to the gold file.

    Header, comments, tokens and MISC are the gold file's; ``column`` holds the predictions; the other NE columns
    hold ``O`` (``_`` where the gold has ``_``, i.e. the column does not apply) and the NEL columns ``_``.
    """
    from spacy.tokens import Span

    from . import hipe

    if len(predictions) != len(eval_set.docs):
        raise ValueError(f"{len(predictions)} predicted units for {len(eval_set.docs)} units of {eval_set.path}.")
    pred_docs = []
    for doc, tags in zip(eval_set.docs, predictions):
        if len(tags) != len(doc):
            raise ValueError(f"A unit of {eval_set.path} has {len(doc)} tokens but {len(tags)} predicted tags.")
        copy = doc.copy()
        copy.ents = [Span(copy, s, e, label=lab) for s, e, lab in hipe.bio_spans(list(tags))]
        pred_docs.append(copy)
    hdocs = hipe.docs_to_hipe(pred_docs, column=eval_set.column, other_columns="original")
    # write the predicted tags verbatim (docs_to_hipe may restore the gold file's spelling of an entity start)
    flat = iter([tag for tags in predictions for tag in tags])
    for hdoc in hdocs:
        for tok in hdoc.tokens:
            tok.values[eval_set.column] = next(flat)
            for col in hdoc.columns[1:]:
                if col == eval_set.column or col == "MISC":
                    continue
                if col in hipe.BIO_COLUMNS:
                    tok.values[col] = "_" if tok.values.get(col, "_") == "_" else "O"
                else:
                    tok.values[col] = "_"
    if next(flat, None) is not None:
        raise ValueError(f"The HIPE documents of {eval_set.path} hold fewer tokens than the predictions.")
    path = Path(path)
    hipe.write_hipe_tsv(hdocs, path)
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^\w.+-]+", "-", name.strip().lower()).strip("-") or "system"


# ============================================================================================
# scoring any spaCy pipeline (e.g. spaCy's own CNN ner) with the same procedure
# ============================================================================================


def _copy_doc(doc: Any, vocab: Any, keep_ents: bool = False) -> Any:
    import copy as _copy

    from spacy.tokens import Doc, Span

    new = Doc(vocab, words=[t.text for t in doc], spaces=[bool(t.whitespace_) for t in doc],
              user_data=_copy.deepcopy(doc.user_data))
    if keep_ents:
        new.ents = [Span(new, e.start, e.end, label=e.label_) for e in doc.ents]
    return new


def pipeline_predictions(nlp: Any, docs: Sequence[Any], batch_size: int = 16) -> List[List[str]]:
    """Run ``nlp`` on fresh copies of ``docs`` (same tokens, no gold entities) and return predicted IOB2 tags."""
    inputs = [_copy_doc(d, nlp.vocab) for d in docs]
    return [doc_bio_tags(d) for d in nlp.pipe(inputs, batch_size=batch_size)]


def score_pipeline(nlp: Any, docs: Union[EvalSet, Sequence[Any]], batch_size: int = 16) -> Dict[str, Any]:
    """Strict seqeval scores of any spaCy pipeline's ``ents`` against gold Docs (or an :class:`EvalSet`)."""
    docs = docs.docs if isinstance(docs, EvalSet) else list(docs)
    return score_tags([doc_bio_tags(d) for d in docs], pipeline_predictions(nlp, docs, batch_size))


def evaluate_pipeline(pipeline: PathLike, sets: Mapping[str, Mapping[str, PathLike]], *, name: str = "spaCy pipeline",
                      output: Optional[PathLike] = None, predictions_dir: Optional[PathLike] = None,
                      unit: str = "document", column: str = DEFAULT_COLUMN, batch_size: int = 16) -> Dict[str, Any]:
    """Score a spaCy pipeline directory on ``{split: {noise: path}}`` (JSON keys as in ``results.json``:
    ``{"system", "dev": {noise: scores}, "test": {noise: scores}}``); optionally write JSON and HIPE predictions."""
    import spacy

    nlp = spacy.load(pipeline)
    result: Dict[str, Any] = {"format": SYSTEM_SCORES_FORMAT, "version": 1, "system": name, "pipeline": str(pipeline),
                              "unit": unit, "column": column, "scoring": "seqeval strict IOB2", "created": _now()}
    for split, paths in sets.items():
        if not paths:
            continue
        result[split] = {}
        for noise, es in load_eval_sets(paths, split, unit=unit, column=column).items():
            pred = pipeline_predictions(nlp, es.docs, batch_size)
            result[split][noise] = score_tags(es.gold, pred)
            if predictions_dir is not None:
                write_predictions_tsv(es, pred, Path(predictions_dir) / f"{split}-{noise}-{_slug(name)}.tsv")
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf8")
    return result


def read_extra_row(spec: str) -> Tuple[str, Dict[str, Dict[str, Any]]]:
    """``"spaCy CNN=metrics/spacy_cnn.json"`` → (row name, test scores per noise level)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"--extra-row {spec!r}: expected NAME=PATH.json, e.g. 'spaCy CNN=metrics/spacy_cnn.json'.")
    p = Path(path.strip())
    if not p.exists():
        raise FileNotFoundError(f"--extra-row {spec!r}: file not found: {p}")
    data = json.loads(p.read_text(encoding="utf8"))
    scores = data.get("test") if isinstance(data, dict) else None
    if not isinstance(scores, dict) or not all(isinstance(v, dict) and "f1" in v for v in scores.values()):
        raise ValueError(f"{p}: expected a 'test' object mapping noise levels to scores (from `evaluate-spacy`).")
    return name.strip(), scores


# ============================================================================================
# outputs: markdown, plots
# ============================================================================================


def results_markdown(results: Mapping[str, Any]) -> str:
    """Markdown tables: micro-F1 per system × test set, then per-type F1 of the chosen setting."""
    test = results["test"]
    noises = list(results["test_sets"])
    chosen = results["chosen"]
    lines = ["# Evaluation results", "",
             f"Strict entity micro-F1 (seqeval, IOB2) on test. Neutralized = chosen on dev "
             f"(k={chosen['k']} per layer, factor={chosen['factor']:g}, layers={chosen['layers']}; "
             f"selection = {chosen['criterion']} {', '.join(chosen['select_on'])}: "
             f"{chosen['dev_selection_score']:.4f} vs baseline {chosen['dev_baseline_selection_score']:.4f}). "
             f"Random control = same layers and counts, random neurons (seed {results['seed']}).", "",
             "| system | " + " | ".join(noises) + " |", "|---|" + "---:|" * len(noises)]
    rows = [(name, test[name]) for name, _ in SYSTEMS] + list(results.get("extra_rows", {}).items())
    for name, scores in rows:
        cells = [f"{scores[n]['f1']:.4f}" if n in scores else "–" for n in noises]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    types = sorted({t for n in noises for sys in ("baseline", "neutralized") for t in test[sys][n]["per_type"]})
    lines += ["", "## Per-type F1 of the chosen setting (change vs baseline)", "",
              "| type | " + " | ".join(noises) + " |", "|---|" + "---:|" * len(noises)]
    for t in types:
        cells = []
        for n in noises:
            neut = test["neutralized"][n]["per_type"].get(t, {}).get("f1", 0.0)
            base = test["baseline"][n]["per_type"].get(t, {}).get("f1", 0.0)
            cells.append(f"{neut:.4f} ({neut - base:+.4f})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "Dev baseline micro-F1: " + ", ".join(f"{n} {s['f1']:.4f}" for n, s in results["dev"]["baseline"].items()),
              f"Dev sweep: {len(results['dev']['sweep'])} settings (see results.json)."]
    return "\n".join(lines) + "\n"


def plot_f1_vs_k(results: Mapping[str, Any], plots_dir: PathLike) -> List[Path]:
    """One PNG per factor: dev selection F1 vs k, a line per layer range, the dev baseline as a horizontal line and,
    when computed, dashed random-control lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    sweep = results["dev"]["sweep"]
    base = results["chosen"]["dev_baseline_selection_score"]
    factors = sorted({r["setting"]["factor"] for r in sweep})
    ranges = list(dict.fromkeys(r["setting"]["layers"] for r in sweep))
    out = []
    for f in factors:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, spec in enumerate(ranges):
            rows = sorted((r for r in sweep if r["setting"]["factor"] == f and r["setting"]["layers"] == spec),
                          key=lambda r: r["setting"]["k"])
            if not rows:
                continue
            ks = [r["setting"]["k"] for r in rows]
            (line,) = ax.plot(ks, [r["selection_score"] for r in rows], marker="o", ms=3, label=f"layers {spec}")
            if all("random_control" in r for r in rows):
                ax.plot(ks, [r["random_control"]["selection_score"] for r in rows], ls="--", color=line.get_color(),
                        alpha=0.7, label=f"layers {spec}, random control")
        ax.axhline(base, color="black", ls=":", label="baseline (no neutralization)")
        ax.set_xlabel("neurons per layer (k)")
        ax.set_ylabel("dev micro-F1 (" + ", ".join(results["chosen"]["select_on"]) + ")")
        ax.set_title(f"Dev F1 vs k, factor {f:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plots_dir / f"f1_vs_k_factor{f:g}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# ============================================================================================
# the whole procedure
# ============================================================================================


def run_evaluation(loaded: Any, ranking: Union[NeuronRanking, ProfileSet, PathLike, Sequence[PathLike]],
                   dev_paths: Mapping[str, PathLike], test_paths: Mapping[str, PathLike], *,
                   ks: Union[str, Sequence[Union[int, float, str]], None] = None,
                   factors: Sequence[float] = DEFAULT_FACTORS, layer_ranges: Sequence[str] = ("all",),
                   select_on: Union[str, Sequence[str], None] = "noisy", output_dir: PathLike = "metrics",
                   plots_dir: Optional[PathLike] = "plots", profile_out: Optional[PathLike] = "profiles/chosen.json",
                   seed: int = 0, dev_random_control: bool = False, unit: str = "document",
                   column: str = DEFAULT_COLUMN, max_length: int = 512, stride: int = 64, batch_size: int = 4096,
                   extra_rows: Sequence[str] = (), ranking_statistic: Optional[str] = None,
                   rank_mode: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Dev sweep → choice on dev → test report, with one loaded model. Writes results.json/.md, predictions, plots.

    ``dev_paths`` / ``test_paths``: ``{noise_name: HIPE TSV or DocBin}`` (``clean`` is the un-noised set).
    Test files are opened only after the choice is fixed. Returns the ``results.json`` content.
    """
    from .architectures import model_shape

    if not dev_paths:
        raise ValueError("No dev set: pass at least --dev clean=PATH (selection is made on dev).")
    if not test_paths:
        raise ValueError("No test set: pass at least --test clean=PATH.")
    dev_files = {Path(p).resolve() for p in dev_paths.values()}
    leaked = [str(p) for p in test_paths.values() if Path(p).resolve() in dev_files]
    if leaked:
        raise ValueError(f"Test files {leaked} are also dev files: choose on dev, report on a separate test set.")
    extra = dict(read_extra_row(spec) for spec in extra_rows)  # fail early on a bad extra row
    source = ranking if isinstance(ranking, (NeuronRanking, ProfileSet)) else load_ranking(ranking, ranking_statistic, rank_mode)
    shape = model_shape(loaded.model)
    if source.site not in ("mlp.up_proj", "mlp.gate_proj"):
        raise ValueError(f"Unknown site {source.site!r} in the ranking.")
    if isinstance(source, ProfileSet):
        k_values = sorted(source.profiles) if ks is None else parse_k_values(ks, shape["intermediate_size"])
    else:
        k_values = default_k_values(shape["intermediate_size"]) if ks is None else parse_k_values(ks, shape["intermediate_size"])
        if source.max_k and k_values[-1] > source.max_k:
            logger.warning("The ranking holds at most %d neurons per layer; larger k are clipped.", source.max_k)
            k_values = sorted({min(k, source.max_k) for k in k_values})
    settings = build_grid(k_values, factors, layer_ranges, shape["num_hidden_layers"])

    # ---- 1. dev only: sweep and choose ------------------------------------------------------
    dev_sets = load_eval_sets(dev_paths, "dev", unit=unit, column=column)
    sweep = sweep_dev(loaded, source, dev_sets, settings, select_on=select_on,
                      random_control_seed=seed if dev_random_control else None, max_length=max_length,
                      stride=stride, batch_size=batch_size, progress=progress)
    choice = choose_setting(sweep, settings)
    ranking_name = getattr(source, "source", None) or json.dumps(source.provenance)[:200]
    chosen_profile = make_profile(source, choice.setting, shape, {
        "method": "top-k of identified ranking, chosen on dev", "ranking": ranking_name,
        "ranking_provenance": dict(source.provenance), "selected_on": "dev", "select_on": list(choice.select_on),
        "dev_selection_score": choice.dev_score, "created": _now()})
    control_profile = chosen_profile.random_control(shape["intermediate_size"], seed=seed)
    logger.info("Chosen on dev: %s (dev %.4f, baseline %.4f)", choice.setting.label, choice.dev_score,
                choice.dev_baseline_score)

    # ---- 2. the choice is fixed: only now read and score test ---------------------------------
    test_scores, test_sets, test_preds = report_on_test(
        loaded, choice, chosen_profile, control_profile, test_paths, unit=unit, column=column,
        max_length=max_length, stride=stride, batch_size=batch_size)

    # ---- 3. outputs ---------------------------------------------------------------------------
    output_dir = Path(output_dir)
    pred_dir = output_dir / "predictions"
    for (system, slug) in SYSTEMS:
        for noise, es in test_sets.items():
            write_predictions_tsv(es, test_preds[system][noise], pred_dir / f"test-{noise}-{slug}.tsv")
    for (system, slug), profile in zip(SYSTEMS[:2], (None, chosen_profile)):
        _, dev_preds = score_sets(loaded, sweep.prepared, dev_sets, profile)
        for noise, es in dev_sets.items():
            write_predictions_tsv(es, dev_preds[noise], pred_dir / f"dev-{noise}-{slug}.tsv")
    profile_path = None
    if profile_out is not None:
        profile_path = chosen_profile.save(profile_out)
        control_profile.save(Path(profile_out).with_name(Path(profile_out).stem + "-random.json"))

    results: Dict[str, Any] = {
        "format": RESULTS_FORMAT, "version": 1, "created": _now(),
        "scoring": "seqeval strict mode, IOB2, micro average over entities; per type from classification_report",
        "unit": unit, "column": column, "seed": seed,
        "model": {**shape, **{k: v for k, v in getattr(loaded, "source", {}).items()}},
        "ranking": {"source": ranking_name, "site": source.site, "provenance": dict(source.provenance)},
        "grid": {"k": k_values, "factors": [float(f) for f in factors], "layer_ranges": list(layer_ranges),
                 "settings": len(settings)},
        "dev_sets": {n: str(p) for n, p in dev_paths.items()},
        "test_sets": {n: str(p) for n, p in test_paths.items()},
        "dev": {"baseline": sweep.baseline, "sweep": sweep.rows},
        "chosen": {**choice.to_dict(), "num_neurons": chosen_profile.num_neurons,
                   "profile": str(profile_path) if profile_path else None},
        "test": test_scores,
        "extra_rows": extra,
        "predictions": str(pred_dir),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf8")
    (output_dir / "results.md").write_text(results_markdown(results), encoding="utf8")
    if plots_dir is not None:
        results["plots"] = [str(p) for p in plot_f1_vs_k(results, plots_dir)]
    return results


def evaluate(base: PathLike, adapter: Optional[PathLike], ranking: Union[PathLike, Sequence[PathLike]],
             dev_paths: Mapping[str, PathLike], test_paths: Mapping[str, PathLike], *, device: str = "auto",
             dtype: str = "auto", merge: bool = True, **kwargs: Any) -> Dict[str, Any]:
    """Load the model once (``modeling.load_token_classifier``) and run :func:`run_evaluation`."""
    from . import modeling

    loaded = modeling.load_token_classifier(base, adapter, device=device, dtype=dtype, merge=merge)
    return run_evaluation(loaded, ranking, dev_paths, test_paths, **kwargs)
