"""The ``ocrneurons_ner`` spaCy component: a LoRA-tuned Llama/Mistral token classifier that sets ``doc.ents``,
with an optional neutralization profile folded into the weights at load time.

    nlp.add_pipe("ocrneurons_ner", config={"model": "/models/mistral-7b", "adapter": "/models/hipe-lora",
                                           "profile": "/models/ocr-profile.json"})

The model is loaded lazily (on first use), because ``spacy.load`` calls the factory before ``from_disk``.
"""
import json
import logging
import shutil
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

from spacy.language import Language
from spacy.pipeline import Pipe
from spacy.tokens import Doc, Span
from spacy.training import Example
from spacy.util import SimpleFrozenList, ensure_path

from .alignment import decode_bio, token_char_spans
from .modeling import (DTYPES, LABELS_FILE, LoadedModel, ModelLoadError, load_token_classifier, load_tokenizer,
                       read_label_map, save_label_map)
from .profile import NeutralizationProfile

logger = logging.getLogger(__name__)

COMPONENT_CFG = "cfg.json"
PROFILE_FILE = "profile.json"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
BASE_DIR = "base"

DEFAULT_CONFIG = {
    "model": None,
    "adapter": None,
    "profile": None,
    "factor": None,
    "device": "auto",
    "dtype": "auto",
    "max_length": 512,
    "stride": 64,
    "batch_size": 4096,
    "local_files_only": True,
    "include_base": False,
    "scorer": {"@scorers": "spacy.ner_scorer.v1"},
}

_EXAMPLE_CONFIG = """\
[components.ocrneurons_ner]
factory = "ocrneurons_ner"
# base checkpoint: local directory (or a hub id already in the local HF cache)
model = "/models/mistral-7b-hipe"
# peft LoRA adapter directory with labels.json (null for an already-merged checkpoint)
adapter = "/models/hipe-lora"
# neutralization profile JSON (null: no neutralization)
profile = "/models/ocr-profile.json"
# null = the profile's own factor
factor = null
device = "auto"
dtype = "auto"
max_length = 512
stride = 64
batch_size = 4096
local_files_only = true
include_base = false"""

if not Span.has_extension("confidence"):
    Span.set_extension("confidence", default=None)


class ConfigError(ValueError):
    """A bad value in the ``ocrneurons_ner`` config; the message shows a valid config."""


def _config_error(msg: str) -> ConfigError:
    return ConfigError(f"{msg}\n\nA valid ocrneurons_ner config looks like this:\n\n{_EXAMPLE_CONFIG}\n")


@Language.factory(
    "ocrneurons_ner",
    assigns=["doc.ents", "token.ent_iob", "token.ent_type"],
    default_config=DEFAULT_CONFIG,
    default_score_weights={"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None},
)
def make_ocrneurons_ner(
    nlp: Language,
    name: str,
    model: Optional[str],
    adapter: Optional[str],
    profile: Optional[str],
    factor: Optional[float],
    device: str,
    dtype: str,
    max_length: int,
    stride: int,
    batch_size: int,
    local_files_only: bool,
    include_base: bool,
    scorer: Optional[Callable],
) -> "OcrNeuronsNER":
    """Create the ``ocrneurons_ner`` component.

    model: base checkpoint directory (Llama/Mistral family) or hub id in the local cache.
    adapter: peft LoRA adapter directory holding the classifier head and ``labels.json`` (null for a merged checkpoint).
    profile: neutralization profile JSON (null: none). factor: overrides the profile's factor (null: the profile's).
    device: "auto" | "cpu" | "cuda:N". dtype: "auto" | "float32" | "bfloat16" | "float16".
    max_length: model window in word pieces (BOS included). stride: overlap between windows, in pieces.
    batch_size: token budget (word pieces, padding included) per forward pass.
    local_files_only: never reach a hub. include_base: copy the base checkpoint into ``to_disk`` output.
    """
    return OcrNeuronsNER(
        nlp.vocab, name=name, model=model, adapter=adapter, profile=profile, factor=factor, device=device,
        dtype=dtype, max_length=max_length, stride=stride, batch_size=batch_size,
        local_files_only=local_files_only, include_base=include_base, scorer=scorer,
    )


class OcrNeuronsNER(Pipe):
    """Sets ``doc.ents`` from a Llama/Mistral token classifier; ``span._.confidence`` is the mean max-probability."""

    def __init__(self, vocab: Any, name: str = "ocrneurons_ner", *, model: Optional[str], adapter: Optional[str] = None,
                 profile: Optional[str] = None, factor: Optional[float] = None, device: str = "auto",
                 dtype: str = "auto", max_length: int = 512, stride: int = 64, batch_size: int = 4096,
                 local_files_only: bool = True, include_base: bool = False, scorer: Optional[Callable] = None) -> None:
        self.vocab = vocab
        self.name = name
        self.scorer = scorer
        self.cfg: Dict[str, Any] = {
            "model": model, "adapter": adapter, "profile": profile, "factor": factor, "device": device,
            "dtype": dtype, "max_length": max_length, "stride": stride, "batch_size": batch_size,
            "local_files_only": local_files_only, "include_base": include_base,
        }
        self._check_cfg()
        self._loaded: Optional[LoadedModel] = None
        self._profile: Optional[NeutralizationProfile] = None
        self._tokenizer_dir: Optional[str] = None
        self._labels_dir: Optional[str] = None

    def __reduce__(self) -> Any:
        # worker processes (nlp.pipe(n_process=N), archives) load the model themselves, once each, instead of
        # receiving a pickled copy of the weights
        state = dict(self.__dict__)
        state["_loaded"] = None
        return (_unpickle_component, (type(self), state))

    # ---------------------------------------------------------------------------------- config
    def _check_cfg(self) -> None:
        cfg = self.cfg
        if not cfg["model"]:
            raise _config_error(f"ocrneurons_ner ({self.name}): 'model' is required (a base checkpoint directory).")
        if cfg["dtype"] not in DTYPES:
            raise _config_error(f"ocrneurons_ner ({self.name}): invalid dtype {cfg['dtype']!r}; use one of {', '.join(DTYPES)}.")
        dev = str(cfg["device"])
        if not (dev in ("auto", "cpu") or dev.startswith("cuda")):
            raise _config_error(f"ocrneurons_ner ({self.name}): invalid device {dev!r}; use 'auto', 'cpu' or 'cuda:N'.")
        if not (isinstance(cfg["max_length"], int) and cfg["max_length"] >= 2):
            raise _config_error(f"ocrneurons_ner ({self.name}): max_length must be an integer >= 2, got {cfg['max_length']!r}.")
        if not (isinstance(cfg["stride"], int) and 0 <= cfg["stride"] < cfg["max_length"] - 1):
            raise _config_error(
                f"ocrneurons_ner ({self.name}): stride must be an integer in [0, max_length - 1), got {cfg['stride']!r}."
            )
        if not (isinstance(cfg["batch_size"], int) and cfg["batch_size"] >= 1):
            raise _config_error(f"ocrneurons_ner ({self.name}): batch_size (a token budget) must be >= 1, got {cfg['batch_size']!r}.")
        if cfg["factor"] is not None and not (isinstance(cfg["factor"], (int, float)) and cfg["factor"] >= 0):
            raise _config_error(f"ocrneurons_ner ({self.name}): factor must be null or a number >= 0, got {cfg['factor']!r}.")

    # ---------------------------------------------------------------------------------- model
    @property
    def labels(self) -> List[str]:
        """The fixed label order; read from the label map without loading the model (spaCy asks for it in
        ``from_disk`` and ``nlp.meta``)."""
        if self._loaded is not None:
            return list(self._loaded.labels)
        for directory in (self.cfg["adapter"], self._labels_dir, self.cfg["model"]):
            try:
                data = read_label_map(directory) if directory and Path(directory).is_dir() else None
            except (OSError, ValueError):
                data = None
            if data:
                return list(data["labels"])
        return []

    @property
    def loaded(self) -> LoadedModel:
        """The model, loaded on first use (adapter merged, profile folded)."""
        if self._loaded is None:
            self._load()
        return self._loaded

    @property
    def profile(self) -> Optional[NeutralizationProfile]:
        if self._profile is None and self.cfg["profile"]:
            self._profile = NeutralizationProfile.load(self.cfg["profile"])
        return self._profile

    def _load(self) -> None:
        cfg = self.cfg
        profile = self.profile  # read first: a bad profile path fails before the (slow) model load
        saved = read_label_map(self._labels_dir) if self._labels_dir else None
        loaded = load_token_classifier(
            cfg["model"], cfg["adapter"], device=cfg["device"], dtype=cfg["dtype"],
            local_files_only=cfg["local_files_only"], merge=True, labels=saved["labels"] if saved else None,
        )
        if saved:
            loaded.bidirectional = bool(saved.get("bidirectional"))
        if self._tokenizer_dir:
            loaded.tokenizer = load_tokenizer([self._tokenizer_dir], True)
        if profile is not None:
            profile.fold(loaded.model, cfg["factor"])
        elif cfg["factor"] is not None:
            logger.warning("ocrneurons_ner: 'factor' is set but no 'profile' is given; nothing is neutralized.")
        self._loaded = loaded

    # ------------------------------------------------------------------------------- inference
    def __call__(self, doc: Doc) -> Doc:
        return self._annotate([doc])[0]

    def pipe(self, stream: Iterable[Doc], *, batch_size: int = 128) -> Iterator[Doc]:
        """Annotate docs in batches of ``batch_size`` docs; within a batch, windows are length-sorted and packed
        into forward passes under the ``batch_size`` token budget of the config."""
        stream = iter(stream)
        while True:
            docs = list(islice(stream, max(1, batch_size)))
            if not docs:
                return
            yield from self._annotate(docs)

    def predict(self, docs: List[Doc]) -> List[List[Any]]:
        """Per-token ``(tag or None, probability)`` for each doc."""
        from .modeling import tag_texts

        items = [(doc.text, token_char_spans(doc)) for doc in docs]
        todo = [i for i, (text, _) in enumerate(items) if text.strip()]
        out: List[List[Any]] = [[("O", 1.0)] * len(doc) for doc in docs]
        if todo:
            cfg = self.cfg
            tagged = tag_texts(self.loaded, [items[i] for i in todo], max_length=cfg["max_length"],
                               stride=cfg["stride"], batch_size=cfg["batch_size"])
            for i, tags in zip(todo, tagged):
                out[i] = tags
        return out

    def set_annotations(self, docs: List[Doc], predictions: List[List[Any]]) -> None:
        """Decode BIO (with repair) into ``doc.ents``; whitespace tokens never start or end an entity."""
        for doc, preds in zip(docs, predictions):
            tags = [None if tok.is_space else tag for tok, (tag, _) in zip(doc, preds)]
            ents = []
            for start, end, label in decode_bio(tags):
                while start < end and doc[start].is_space:
                    start += 1
                while end > start and doc[end - 1].is_space:
                    end -= 1
                if start >= end:
                    continue
                span = Span(doc, start, end, label=label)
                probs = [preds[i][1] for i in range(start, end) if preds[i][0] is not None]
                span._.confidence = sum(probs) / len(probs) if probs else None
                ents.append(span)
            doc.ents = ents

    def _annotate(self, docs: List[Doc]) -> List[Doc]:
        self.set_annotations(docs, self.predict(docs))
        return docs

    def initialize(self, get_examples: Optional[Callable[[], Iterable[Example]]] = None, *, nlp: Optional[Language] = None) -> None:
        """Nothing to initialise: the model is trained with ``ocrneurons train``. Loads the model to fail early."""
        self.loaded  # noqa: B018

    # --------------------------------------------------------------------------- serialization
    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> None:
        """Write config, label map, adapter (safetensors), profile and tokenizer; the base is referenced by path
        (copied under ``base/`` when ``include_base`` is true)."""
        path = ensure_path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = dict(self.cfg)
        base = Path(cfg["model"]).expanduser()
        if cfg["include_base"]:
            if not base.is_dir():
                raise ModelLoadError(f"include_base is true but the base model {str(base)!r} is not a local directory.")
            if base.resolve() != (path / BASE_DIR).resolve():
                _copy_tree(base, path / BASE_DIR)
            cfg["model"] = BASE_DIR
        elif base.exists():
            cfg["model"] = str(base.resolve())
        if cfg["adapter"]:
            src = Path(cfg["adapter"])
            if not (src / "adapter_config.json").exists():
                raise ModelLoadError(f"LoRA adapter not found: expected {str(src / 'adapter_config.json')!r}.")
            if src.resolve() != (path / ADAPTER_DIR).resolve():
                _copy_tree(src, path / ADAPTER_DIR, only=("adapter_config.json", "adapter_model.safetensors", LABELS_FILE))
            cfg["adapter"] = ADAPTER_DIR
        else:
            save_label_map(path, self.labels, bidirectional=self.loaded.bidirectional)
        if self.profile is not None:
            self.profile.save(path / PROFILE_FILE)
            cfg["profile"] = PROFILE_FILE
        self.loaded.tokenizer.save_pretrained(str(path / TOKENIZER_DIR))
        cfg.pop("scorer", None)
        (path / COMPONENT_CFG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf8")

    def from_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = SimpleFrozenList()) -> "OcrNeuronsNER":
        """Read what :meth:`to_disk` wrote; the model itself is loaded on first use."""
        path = ensure_path(path)
        cfg_path = path / COMPONENT_CFG
        if not cfg_path.exists():
            raise ModelLoadError(f"ocrneurons_ner: expected {str(cfg_path)!r} (written by nlp.to_disk).")
        cfg = json.loads(cfg_path.read_text(encoding="utf8"))
        for key in ("adapter", "profile"):
            if cfg.get(key):
                cfg[key] = str(path / cfg[key])
                if not Path(cfg[key]).exists():
                    raise ModelLoadError(f"ocrneurons_ner: the saved {key} is missing: expected {cfg[key]!r}.")
        if cfg.get("model") == BASE_DIR:
            cfg["model"] = str(path / BASE_DIR)
        if not Path(cfg["model"]).expanduser().exists() and cfg.get("local_files_only", True):
            raise ModelLoadError(
                f"ocrneurons_ner: the base model this pipeline references is missing: expected a directory at "
                f"{cfg['model']!r}. Put the checkpoint there, or re-save with include_base=true."
            )
        self._labels_dir = str(path) if not cfg.get("adapter") and (path / LABELS_FILE).exists() else None
        self.cfg.update({k: v for k, v in cfg.items() if k in self.cfg})
        self._tokenizer_dir = str(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).exists() else None
        self._loaded = None
        self._profile = None
        return self

    def to_bytes(self, *, exclude: Iterable[str] = SimpleFrozenList()) -> bytes:
        raise NotImplementedError("ocrneurons_ner holds model files: use nlp.to_disk / spacy.load instead of to_bytes.")

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = SimpleFrozenList()) -> "OcrNeuronsNER":
        raise NotImplementedError("ocrneurons_ner holds model files: use nlp.to_disk / spacy.load instead of from_bytes.")


def _unpickle_component(cls: type, state: Dict[str, Any]) -> "OcrNeuronsNER":
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _copy_tree(src: Path, dst: Path, only: Optional[Iterable[str]] = None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if only is not None and item.name not in only:
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)
