"""LoRA fine-tuning of Llama/Mistral token classifiers, with model selection on dev and exact resumption.

The recipe follows the paper's code (LoRA on ``mlp.up_proj``, r=12, alpha=32, dropout 0.1, AdamW lr 1e-4,
weight decay 0.01, linear decay) but fixes its defects: checkpoints are selected on the **dev** split (the test
split is never an input here), and long sentences are windowed instead of truncated.

Training data are sentences ``(words, tags, spaces)`` (see :func:`load_sentences`). A sentence's text is its
words joined with a space where ``spaces[i]`` is true; it is encoded with :func:`alignment.encode_text` and
windowed with :func:`modeling.windows_for_text`, the same code the ``ocrneurons_ner`` component uses at
inference, so labels are learned on the pieces they are later read from.

Output directory layout::

    best/             adapter with the highest dev F1 (adapter files + labels.json + tokenizer)
    last/             adapter after the last evaluation
    checkpoint/       adapter weights, optimizer, scheduler, RNG states, position (for resume=True)
    metrics.json      settings, label order, dev scores of every evaluation, the best one
    training_log.jsonl one JSON record per logged step and per evaluation
"""
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .alignment import IGNORE_INDEX, encode_text, label_list, piece_labels

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
#: One sentence: words, BIO tags (one per word), and whether each word is followed by a space.
Sentence = Tuple[List[str], List[str], List[bool]]

TRAIN_ON = ("clean", "noisy", "mixed")
SCHEDULES = ("linear", "cosine", "constant")
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.json"
LOG_FILE = "training_log.jsonl"

#: Defaults of :func:`train_token_classifier`, as in ``configs/train.cfg`` (paper values for the LoRA recipe).
DEFAULT_TRAIN_SETTINGS: Dict[str, Any] = {
    "lora_r": 12,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "target_modules": ["up_proj"],
    "lr": 1e-4,
    "weight_decay": 0.01,
    "schedule": "linear",
    "warmup_ratio": 0.0,
    "max_grad_norm": 1.0,
    "epochs": 3,
    "batch_size": 16,
    "max_length": 512,
    "stride": 64,
    "seed": 0,
    "eval_every": None,
    "train_on": "clean",
    "bidirectional": False,
    "device": "auto",
    "dtype": "auto",
}

#: Config file section/key → keyword of :func:`train_token_classifier` (or of the CLI, for ``column``).
CONFIG_KEYS: Dict[Tuple[str, str], str] = {
    ("lora", "r"): "lora_r",
    ("lora", "alpha"): "lora_alpha",
    ("lora", "dropout"): "lora_dropout",
    ("lora", "target_modules"): "target_modules",
    ("optimizer", "lr"): "lr",
    ("optimizer", "weight_decay"): "weight_decay",
    ("optimizer", "schedule"): "schedule",
    ("optimizer", "warmup_ratio"): "warmup_ratio",
    ("optimizer", "max_grad_norm"): "max_grad_norm",
    ("training", "epochs"): "epochs",
    ("training", "batch_size"): "batch_size",
    ("training", "max_length"): "max_length",
    ("training", "stride"): "stride",
    ("training", "seed"): "seed",
    ("training", "eval_every"): "eval_every",
    ("training", "train_on"): "train_on",
    ("training", "bidirectional"): "bidirectional",
    ("training", "device"): "device",
    ("training", "dtype"): "dtype",
    ("data", "column"): "column",
}


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def load_train_config(path: Optional[PathLike] = None, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Training settings: built-in defaults, then the ``.cfg`` (thinc Config) or ``.json`` file, then ``overrides``.

    Returns a flat dict of :func:`train_token_classifier` keywords plus ``column`` (the HIPE tag column).
    ``overrides`` with value None are ignored (CLI options left unset). Unknown keys raise ValueError.
    """
    settings: Dict[str, Any] = dict(DEFAULT_TRAIN_SETTINGS, column="NE-COARSE-LIT")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Training config not found: {path}")
        if path.suffix == ".json":
            sections = json.loads(path.read_text(encoding="utf8"))
        else:
            from thinc.api import Config

            sections = Config().from_disk(path, interpolate=True)
        if not isinstance(sections, dict):
            raise ValueError(f"{path}: expected sections ([lora], [optimizer], [training], [data]), got {type(sections).__name__}")
        unknown = []
        for section, values in sections.items():
            if not isinstance(values, dict):
                unknown.append(section)
                continue
            for key, value in values.items():
                name = CONFIG_KEYS.get((section, key))
                if name is None:
                    if section != "pretrain":  # read by `pretrain-base`, see load_pretrain_config
                        unknown.append(f"{section}.{key}")
                else:
                    settings[name] = value
        if unknown:
            valid = ", ".join(f"{s}.{k}" for s, k in CONFIG_KEYS)
            raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {valid} (and [pretrain]).")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in settings:
            raise ValueError(f"Unknown training setting {key!r}; valid: {', '.join(sorted(settings))}")
        settings[key] = value
    return settings


def load_pretrain_config(path: Optional[PathLike] = None) -> Dict[str, Any]:
    """The ``[pretrain]`` section of a training config (settings of :func:`base_model.build_demo_base_model`)."""
    if path is None:
        return {}
    path = Path(path)
    if path.suffix == ".json":
        sections = json.loads(path.read_text(encoding="utf8"))
    else:
        from thinc.api import Config

        sections = Config().from_disk(path, interpolate=True)
    return dict(sections.get("pretrain", {}))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def as_sentence(item: Any) -> Sentence:
    """``(words, tags, spaces)`` from a tuple or from an object with those attributes (e.g. ``NoisySentence``)."""
    if hasattr(item, "words") and hasattr(item, "tags"):
        words, tags, spaces = item.words, item.tags, getattr(item, "spaces", None)
    else:
        words, tags, spaces = item[0], item[1], (item[2] if len(item) > 2 else None)
    words, tags = list(words), list(tags)
    spaces = [True] * len(words) if spaces is None else [bool(s) for s in spaces]
    if not (len(words) == len(tags) == len(spaces)):
        raise ValueError(f"Sentence with {len(words)} words, {len(tags)} tags and {len(spaces)} space flags: {words[:8]}")
    return words, tags, spaces


def sentence_text(words: Sequence[str], spaces: Sequence[bool]) -> Tuple[str, List[Tuple[int, int]]]:
    """The sentence's text (words joined by a space where ``spaces[i]``) and each word's character span."""
    parts: List[str] = []
    spans: List[Tuple[int, int]] = []
    pos = 0
    for word, space in zip(words, spaces):
        spans.append((pos, pos + len(word)))
        parts.append(word)
        pos += len(word)
        if space:
            parts.append(" ")
            pos += 1
    return "".join(parts), spans


def docs_to_sentences(docs: Iterable[Any], split_sentences: bool = True) -> List[Sentence]:
    """Sentences from spaCy Docs (per ``doc.sents`` when set and ``split_sentences``, else one per Doc);
    whitespace tokens are dropped."""
    from .hipe import doc_bio_tags

    out: List[Sentence] = []
    for doc in docs:
        tags = doc_bio_tags(doc)
        spans = list(doc.sents) if split_sentences and doc.has_annotation("SENT_START") else [doc[:]]
        for span in spans:
            words: List[str] = []
            stags: List[str] = []
            spaces: List[bool] = []
            for tok in span:
                if tok.is_space:
                    if spaces:
                        spaces[-1] = True
                    continue
                words.append(tok.text)
                tag = tags[tok.i]
                if tag.startswith("I-") and (not stags or stags[-1] == "O" or stags[-1][2:] != tag[2:]):
                    tag = "B-" + tag[2:]  # entity whose first token was a whitespace token
                stags.append(tag)
                spaces.append(bool(tok.whitespace_))
            if words:
                out.append((words, stags, spaces))
    return out


UNITS = ("sentence", "segment", "document")


def load_sentences(path: PathLike, column: str = "NE-COARSE-LIT", lang: str = "fr", unit: str = "sentence") -> List[Sentence]:
    """Read training units ``(words, tags, spaces)`` from a HIPE ``.tsv`` file or a spaCy ``.spacy`` DocBin.

    ``unit``: ``sentence`` (split on EndOfSentence / ``doc.sents``), ``segment`` (HIPE segments) or ``document``
    (whole documents, windowed over word pieces like the component does on pages)."""
    if unit not in UNITS:
        raise ValueError(f"Unknown unit {unit!r}; choose one of {', '.join(UNITS)}.")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file not found: {path}")
    if path.suffix == ".tsv":
        from .hipe import hipe_to_docs, iter_sentences, read_hipe_tsv

        if unit == "sentence":
            return [(w, t, s) for w, t, s in iter_sentences(read_hipe_tsv(path), column) if w]
        docs = hipe_to_docs(read_hipe_tsv(path), column=column, split=unit)
        return [x for x in docs_to_sentences(docs, split_sentences=False) if x[0]]
    if path.suffix == ".spacy":
        from .hipe import read_docbin

        return docs_to_sentences(read_docbin(path, lang=lang), split_sentences=unit == "sentence")
    raise ValueError(f"Unsupported data file {str(path)!r}: expected a HIPE .tsv or a spaCy .spacy DocBin.")


def load_texts(path: PathLike, column: str = "NE-COARSE-LIT") -> List[str]:
    """Raw texts for language-model pretraining: one per sentence of a .tsv/.spacy file, or one per line of a .txt."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.exists():
            raise FileNotFoundError(f"Text file not found: {path}")
        return [line.strip() for line in path.read_text(encoding="utf8").splitlines() if line.strip()]
    return [sentence_text(w, s)[0] for w, _, s in load_sentences(path, column)]


def entity_types(sentences: Iterable[Sentence]) -> List[str]:
    """Sorted entity types found in the sentences' BIO tags."""
    types = set()
    for _, tags, _ in sentences:
        for tag in tags:
            if tag.startswith(("B-", "I-")):
                types.add(tag[2:])
            elif tag != "O":
                raise ValueError(f"Tag {tag!r} is not BIO (expected 'O', 'B-X' or 'I-X').")
    return sorted(types)


@dataclass
class TrainingExample:
    """One model input: piece ids (BOS first if used) and targets (-100 where no label is learned)."""

    input_ids: List[int]
    labels: List[int]


def build_examples(tokenizer: Any, sentences: Sequence[Sentence], label2id: Dict[str, int], max_length: int,
                   stride: int) -> List[TrainingExample]:
    """Encode sentences into training windows: first-piece targets, BOS prepended if the tokenizer uses one,
    long sentences split into overlapping windows (each piece is labelled in the window that owns it)."""
    from .modeling import windows_for_text

    examples: List[TrainingExample] = []
    for words, tags, spaces in sentences:
        text, spans = sentence_text(words, spaces)
        enc = encode_text(tokenizer, text, spans)
        if not enc.input_ids:
            continue
        targets = piece_labels(enc, tags, label2id)
        for w in windows_for_text(tokenizer, enc, max_length, stride):
            labels = [IGNORE_INDEX] * len(w.ids)
            for piece in range(w.owned_start, w.owned_end):
                labels[piece - w.piece_start + w.offset] = targets[piece]
            examples.append(TrainingExample(list(w.ids), labels))
    return examples


def collate(examples: Sequence[TrainingExample], pad_id: int) -> Tuple[Any, Any, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding) tensors."""
    import torch

    from .modeling import pad_batch

    ids, mask = pad_batch([e.input_ids for e in examples], pad_id)
    labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        labels[r, : len(e.input_ids)] = torch.tensor(e.labels, dtype=torch.long)
    return ids, mask, labels


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def predict_sentences(loaded: Any, sentences: Sequence[Sentence], *, max_length: int = 512, stride: int = 64,
                      batch_size: int = 4096) -> List[List[str]]:
    """Predicted BIO tags per sentence with :func:`modeling.tag_texts` and the component's BIO decoding."""
    from .evaluation import tags_from_token_predictions
    from .modeling import tag_texts

    items = [sentence_text(w, s) for w, _, s in sentences]
    tagged = tag_texts(loaded, items, max_length=max_length, stride=stride, batch_size=batch_size)
    return [tags_from_token_predictions(tt) for tt in tagged]


def evaluate_sentences(loaded: Any, sentences: Sequence[Sentence], *, max_length: int = 512, stride: int = 64,
                       batch_size: int = 4096) -> Dict[str, float]:
    """Entity micro P/R/F1 (seqeval strict, IOB2) of a loaded model on gold sentences."""
    from .evaluation import score_tags

    pred = predict_sentences(loaded, sentences, max_length=max_length, stride=stride, batch_size=batch_size)
    scores = score_tags([t for _, t, _ in sentences], pred)
    return {k: scores[k] for k in ("precision", "recall", "f1", "n_gold", "n_pred")}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """What :func:`train_token_classifier` produced."""

    output_dir: Path
    best_dir: Path
    last_dir: Path
    labels: List[str]
    best: Dict[str, Any]
    evaluations: List[Dict[str, Any]]
    finished: bool
    model: Any = field(default=None, repr=False)  # the in-memory peft model (last weights, eval mode)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf8")).hexdigest()


def _rng_state() -> Dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """Shuffled example order of one epoch, a function of (seed, epoch) only, so resuming needs no RNG."""
    order = list(range(n))
    random.Random(f"ocrneurons-train-{seed}-{epoch}").shuffle(order)
    return order


def _save_adapter(model: Any, tokenizer: Any, directory: Path, labels: Sequence[str], bidirectional: bool,
                  extra: Dict[str, Any]) -> None:
    """Write a complete adapter directory (atomically: to a temp dir, then renamed)."""
    from .modeling import save_label_map

    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    save_label_map(tmp, labels, bidirectional=bidirectional, **extra)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _trainable_state(model: Any) -> Dict[str, Any]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any, state: Dict[str, Any]) -> None:
    import torch

    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(_trainable_state(model), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2, ensure_ascii=False) + "\n", encoding="utf8")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _load_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any) -> Dict[str, Any]:
    import torch

    state = json.loads((directory / "state.json").read_text(encoding="utf8"))
    trainable = torch.load(directory / "trainable.pt", map_location="cpu")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trainable]
    if missing:
        raise ValueError(f"Checkpoint {directory} lacks trainable parameters {missing[:3]}...; start over with resume=False.")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location="cpu"))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", map_location="cpu"))
    _set_rng_state(torch.load(directory / "rng.pt", map_location="cpu", weights_only=False))
    return state


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf8")
    os.replace(tmp, path)


def _truncate_log(path: Path, max_step: int) -> None:
    """Drop log records written after the checkpoint we resume from."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(l + "\n" for l in keep), encoding="utf8")


def train_token_classifier(
    base_model_dir: PathLike,
    train_data: Sequence[Any],
    dev_data: Sequence[Any],
    output_dir: PathLike,
    *,
    noisy_train_data: Optional[Sequence[Any]] = None,
    train_on: str = "clean",
    arch: str = "auto",
    labels: Optional[Sequence[str]] = None,
    lora_r: int = 12,
    lora_alpha: float = 32,
    lora_dropout: float = 0.1,
    target_modules: Sequence[str] = ("up_proj",),
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    schedule: str = "linear",
    warmup_ratio: float = 0.0,
    max_grad_norm: Optional[float] = 1.0,
    epochs: int = 3,
    batch_size: int = 16,
    max_length: int = 512,
    stride: int = 64,
    seed: int = 0,
    bidirectional: bool = False,
    resume: bool = True,
    eval_every: Optional[int] = None,
    device: str = "auto",
    dtype: str = "auto",
    log_every: int = 10,
    progress: bool = True,
    stop_after_epoch: Optional[int] = None,
    stop_after_step: Optional[int] = None,
) -> TrainingResult:
    """Fine-tune a LoRA adapter (plus a new classifier head) on a causal-LM base for token classification.

    ``train_data``/``dev_data``/``noisy_train_data``: sequences of ``(words, tags, spaces)`` (or objects with
    those attributes). ``train_on``: ``clean`` (train_data), ``noisy`` (noisy_train_data) or ``mixed`` (both,
    shuffled with ``seed``). The label order is ``label_list(types in train + dev)`` unless ``labels`` is given.
    Dev strict entity micro-F1 (seqeval, IOB2) is computed after each epoch (and every ``eval_every`` optimizer
    steps if set); the best adapter goes to ``output_dir/best``, the latest to ``output_dir/last``.
    A checkpoint is written at each evaluation; with ``resume=True`` a later call continues from it and ends
    with the same weights as an uninterrupted run. ``stop_after_epoch``/``stop_after_step`` stop early (as if
    interrupted) after the evaluation that reaches them. ``bidirectional`` trains with all-visible attention and
    records it in ``labels.json``. No test data is ever taken: select on dev, evaluate test separately.
    """
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, TaskType, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer, get_scheduler

    from .architectures import decoder_layers
    from .modeling import LoadedModel, resolve_device, resolve_dtype

    base_model_dir = Path(base_model_dir)
    output_dir = Path(output_dir)
    if not (base_model_dir / "config.json").exists():
        raise FileNotFoundError(f"Base model directory {str(base_model_dir)!r} has no config.json (run `ocrneurons pretrain-base` or pass a HF checkpoint dir).")
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 optimizer steps or None (once per epoch), got {eval_every}")

    clean = [as_sentence(s) for s in train_data]
    noisy = [as_sentence(s) for s in noisy_train_data] if noisy_train_data is not None else None
    dev = [as_sentence(s) for s in dev_data]
    if train_on in ("noisy", "mixed") and not noisy:
        raise ValueError(f"train_on={train_on!r} needs noisy_train_data (e.g. made with spacy_ocrneurons.noise).")
    if train_on == "clean":
        train = clean
    elif train_on == "noisy":
        train = list(noisy)
    else:
        train = clean + list(noisy)
        random.Random(f"ocrneurons-mixed-{seed}").shuffle(train)
    if not train:
        raise ValueError("No training sentences.")
    if not dev:
        raise ValueError("No dev sentences: model selection needs a dev set (the test set is never used for it).")

    if labels is None:
        labels = label_list(entity_types(list(clean) + list(noisy or []) + dev))
    labels = list(labels)
    label2id = {l: i for i, l in enumerate(labels)}

    config = AutoConfig.from_pretrained(str(base_model_dir), local_files_only=True)
    model_type = getattr(config, "model_type", "?")
    if arch not in ("auto", model_type):
        raise ValueError(f"arch={arch!r} but {base_model_dir} holds a {model_type!r} model.")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir), local_files_only=True, use_fast=True)
    if not tokenizer.is_fast:
        raise ValueError(f"The tokenizer of {base_model_dir} is not a fast tokenizer (tokenizer.json needed).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"

    examples = build_examples(tokenizer, train, label2id, max_length, stride)
    if not examples:
        raise ValueError("The training sentences produced no word pieces.")
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = steps_per_epoch * epochs

    settings = dict(
        base_model=str(base_model_dir.resolve()), model_type=model_type, train_on=train_on, labels=labels,
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
        lr=lr, weight_decay=weight_decay, schedule=schedule, warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm,
        epochs=epochs, batch_size=batch_size, max_length=max_length, stride=stride, seed=seed,
        bidirectional=bool(bidirectional), eval_every=eval_every, dtype=str(dtype),
    )
    data_info = dict(
        train_sentences=len(train), clean_sentences=len(clean), noisy_sentences=len(noisy or []),
        dev_sentences=len(dev), train_windows=len(examples), steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        train_sha1=_fingerprint(train), dev_sha1=_fingerprint(dev),
    )
    fingerprint = _fingerprint({"settings": settings, "train": data_info["train_sha1"], "dev": data_info["dev_sha1"]})

    dev_t = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev_t)
    torch.manual_seed(seed)
    net = AutoModelForTokenClassification.from_pretrained(
        str(base_model_dir), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id,
        torch_dtype=torch_dtype, local_files_only=True,
    )
    decoder_layers(net)  # clear error for unsupported architectures
    net.config.pad_token_id = tokenizer.pad_token_id
    lora_config = LoraConfig(
        task_type=TaskType.TOKEN_CLS, inference_mode=False, r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, target_modules=list(target_modules), modules_to_save=["score"],
    )
    model = get_peft_model(net, lora_config)
    model.to(dev_t)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_scheduler(schedule if schedule != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(round(warmup_ratio * total_steps)), num_training_steps=total_steps)

    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = output_dir / CHECKPOINT_DIR
    best_dir, last_dir = output_dir / "best", output_dir / "last"
    log_path = output_dir / LOG_FILE
    evaluations: List[Dict[str, Any]] = []
    best: Dict[str, Any] = {}
    epoch, step_in_epoch, global_step = 0, 0, 0
    running, n_running = 0.0, 0  # sum and count of this epoch's batch losses
    elapsed_before = 0.0
    if resume and (ckpt_dir / "state.json").exists():
        previous = json.loads((ckpt_dir / "state.json").read_text(encoding="utf8"))
        if previous.get("fingerprint") != fingerprint:
            old = previous.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            what = ", ".join(diff) if diff else "the training or dev data"
            raise ValueError(
                f"Cannot resume from {ckpt_dir}: it was made with different settings ({what}). "
                "Use the same settings, another output directory, or resume=False to start over."
            )
        state = _load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        evaluations, best = state["evaluations"], state["best"]
        elapsed_before = state.get("elapsed_s", 0.0)
        running, n_running = state.get("running_loss", [0.0, 0])
        _truncate_log(log_path, global_step)
        logger.info("Resuming from %s at epoch %d, step %d/%d", ckpt_dir, epoch, global_step, total_steps)
    else:
        for stale in (ckpt_dir, best_dir, last_dir):
            if stale.exists():
                shutil.rmtree(stale)
        if log_path.exists():
            log_path.unlink()

    loaded = LoadedModel(model=model, tokenizer=tokenizer, labels=labels, bidirectional=bool(bidirectional),
                         device=dev_t, dtype=torch_dtype)
    adapter_extra = {"base_model": str(base_model_dir), "train_on": train_on}
    pad_id = tokenizer.pad_token_id
    from .modeling import model_inputs

    start_time = time.time()

    def log(record: Dict[str, Any]) -> None:
        with log_path.open("a", encoding="utf8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def write_metrics(finished: bool) -> None:
        _write_json(output_dir / METRICS_FILE, {
            "selection": "dev split, seqeval strict entity micro-F1 (IOB2); test data is never used in training",
            "labels": labels, "settings": settings, "data": data_info, "evaluations": evaluations,
            "best": best, "finished": finished, "elapsed_s": round(elapsed_before + time.time() - start_time, 2),
        })

    def evaluate_and_checkpoint(train_loss: Optional[float]) -> None:
        nonlocal best
        model.eval()
        scores = evaluate_sentences(loaded, dev, max_length=max_length, stride=stride,
                                    batch_size=max(batch_size * max_length, 4096))
        model.train()
        record = {"event": "eval", "epoch": epoch + (step_in_epoch / steps_per_epoch), "step": global_step,
                  "train_loss": train_loss, **{f"dev_{k}": v for k, v in scores.items()}}
        evaluations.append(record)
        log(record)
        if not best or scores["f1"] > best["dev_f1"]:
            best = dict(record)
            _save_adapter(model, tokenizer, best_dir, labels, bool(bidirectional),
                          dict(adapter_extra, selected_on="dev", dev_f1=scores["f1"], step=global_step))
        _save_adapter(model, tokenizer, last_dir, labels, bool(bidirectional),
                      dict(adapter_extra, dev_f1=scores["f1"], step=global_step))
        _save_checkpoint(ckpt_dir, model, optimizer, scheduler, {
            "fingerprint": fingerprint, "settings": settings, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "global_step": global_step, "evaluations": evaluations, "best": best,
            "running_loss": [running, n_running], "elapsed_s": elapsed_before + time.time() - start_time,
        })
        write_metrics(finished=global_step >= total_steps)

    model.train()
    stopped = False
    bar = tqdm(total=total_steps, initial=global_step, desc="train", unit="step", disable=not progress)
    while epoch < epochs and not stopped:
        order = _epoch_order(len(examples), seed, epoch)
        if step_in_epoch == 0:
            running, n_running = 0.0, 0
        while step_in_epoch < steps_per_epoch:
            idx = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
            ids, mask, targets = collate([examples[i] for i in idx], pad_id)
            ids, mask, targets = ids.to(dev_t), mask.to(dev_t), targets.to(dev_t)
            logits = model(**model_inputs(model, ids, mask, bidirectional=bool(bidirectional))).logits
            if (targets != IGNORE_INDEX).any():
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=IGNORE_INDEX)
            else:  # a batch without labelled pieces: keep the step (same schedule), learn nothing
                loss = logits.float().sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            step_in_epoch += 1
            global_step += 1
            running += float(loss.detach())
            n_running += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / n_running:.4f}")
            if global_step % log_every == 0:
                log({"event": "train", "epoch": epoch, "step": global_step, "loss": running / n_running,
                     "lr": scheduler.get_last_lr()[0]})
            end_of_epoch = step_in_epoch == steps_per_epoch
            if end_of_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            if end_of_epoch or (eval_every and global_step % eval_every == 0):
                evaluate_and_checkpoint(running / n_running)
                if (stop_after_step is not None and global_step >= stop_after_step) or (
                        stop_after_epoch is not None and end_of_epoch and epoch >= stop_after_epoch):
                    stopped = True
                    break
            if end_of_epoch:
                break
    bar.close()
    finished = global_step >= total_steps
    write_metrics(finished)
    model.eval()
    return TrainingResult(output_dir=output_dir, best_dir=best_dir, last_dir=last_dir, labels=labels, best=best,
                          evaluations=evaluations, finished=finished, model=model)
