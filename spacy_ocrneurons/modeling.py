"""Model loading and batched inference for Llama/Mistral token classifiers (with or without a LoRA adapter).

A trained adapter directory holds the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``; the
classifier head ``score`` in ``modules_to_save``), ``labels.json`` (the fixed label order and whether the model was
trained with bidirectional attention) and the tokenizer. A merged checkpoint is a plain HF directory whose
``config.json`` holds ``id2label`` (and ``labels.json`` if we wrote it).
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .alignment import EncodedText, encode_texts, plan_windows

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
LABELS_FORMAT = "spacy-ocrneurons/labels"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(OSError):
    """A base model, adapter or tokenizer could not be found or loaded."""


def save_label_map(directory: Union[str, Path], labels: Sequence[str], bidirectional: bool = False, **extra: Any) -> Path:
    """Write ``labels.json``: the fixed label order (index = class id) and the attention mode."""
    path = Path(directory) / LABELS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": LABELS_FORMAT, "version": 1, "labels": list(labels), "bidirectional": bool(bidirectional)}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf8")
    return path


def read_label_map(directory: Union[str, Path, None]) -> Optional[Dict[str, Any]]:
    """Read ``labels.json`` from a directory, or None if there is none."""
    if directory is None:
        return None
    path = Path(directory) / LABELS_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf8"))
    labels = data.get("labels")
    if not isinstance(labels, list) or not labels or "O" not in labels:
        raise ModelLoadError(f"{path}: 'labels' must be a non-empty list of BIO labels including 'O', got {labels!r:.100}")
    data.setdefault("bidirectional", False)
    return data


def resolve_device(device: str = "auto") -> Any:
    """``auto`` → the first CUDA device if there is one, else CPU; ``cpu`` / ``cuda:N`` as given."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"Invalid device {device!r}: use 'auto', 'cpu' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available on this machine; use 'cpu' or 'auto'.")
    return dev


def resolve_dtype(dtype: str, device: Any) -> Any:
    """``auto`` → bfloat16 on GPUs that support it (else float16), float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"Invalid dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    """A token classifier ready for inference, with its tokenizer and label map."""

    model: Any
    tokenizer: Any
    labels: List[str]
    bidirectional: bool = False
    device: Any = None
    dtype: Any = None
    source: Dict[str, Optional[str]] = field(default_factory=dict)

    @property
    def label2id(self) -> Dict[str, int]:
        return {l: i for i, l in enumerate(self.labels)}


def _check_dir(path: Union[str, Path], what: str, local_files_only: bool) -> Optional[Path]:
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{what} {str(path)!r} is a file; expected a directory with config/weights.")
        return p
    looks_like_path = str(path).startswith(("/", ".", "~")) or str(path).count("/") > 1
    if looks_like_path or local_files_only:
        raise ModelLoadError(
            f"{what} not found: expected a local directory at {str(p.resolve())!r}"
            + ("" if looks_like_path else " (or a hub id in the local HF cache; set local_files_only=false to allow downloads)")
            + "."
        )
    return None


def load_tokenizer(sources: Sequence[Union[str, Path, None]], local_files_only: bool) -> Any:
    """The first fast tokenizer found in ``sources`` (directories or hub ids), with a pad token set."""
    from transformers import AutoTokenizer

    errors = []
    for src in sources:
        if src is None:
            continue
        if Path(src).is_dir() and not any((Path(src) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(src), local_files_only=local_files_only, use_fast=True)
        except (OSError, ValueError) as err:
            errors.append(f"{src}: {err}")
            continue
        if not tok.is_fast:
            raise ModelLoadError(f"The tokenizer in {src} is not a fast tokenizer (no tokenizer.json): offsets are needed.")
        if tok.pad_token_id is None:
            tok.pad_token = tok.unk_token or tok.eos_token
        return tok
    raise ModelLoadError(f"No tokenizer found in {[str(s) for s in sources if s]}. " + "; ".join(errors))


def load_token_classifier(model: Union[str, Path], adapter: Union[str, Path, None] = None, *, device: str = "auto",
                          dtype: str = "auto", local_files_only: bool = True, merge: bool = True,
                          labels: Optional[Sequence[str]] = None) -> LoadedModel:
    """Load a Llama/Mistral token classifier: base checkpoint + optional peft LoRA adapter (merged by default).

    The label order comes from the adapter's ``labels.json`` (or the checkpoint's ``labels.json``/``id2label``).
    Unsupported architectures raise :class:`~spacy_ocrneurons.architectures.UnsupportedArchitectureError`.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    from .architectures import decoder_layers

    base_dir = _check_dir(model, "Base model", local_files_only)
    adapter_dir = _check_dir(adapter, "LoRA adapter", True) if adapter else None
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").exists():
        raise ModelLoadError(f"LoRA adapter directory {str(adapter_dir)!r} has no adapter_config.json.")
    label_map = read_label_map(adapter_dir) or read_label_map(base_dir)
    try:
        config = AutoConfig.from_pretrained(str(model), local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not read the model config of {str(model)!r}: {err}") from None
    if labels is None:
        if label_map is not None:
            labels = label_map["labels"]
        elif adapter_dir is None and getattr(config, "id2label", None) and len(config.id2label) > 2:
            labels = [config.id2label[i] for i in range(len(config.id2label))]
        else:
            expected = (adapter_dir or base_dir or Path(str(model))) / LABELS_FILE
            raise ModelLoadError(f"No label map: expected {str(expected)!r} (written by `ocrneurons train`).")
    labels = list(labels)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if adapter_dir is not None:  # the classifier head comes from the adapter: silence "newly initialized: score"
        hf_logging.set_verbosity_error()
    try:
        net = AutoModelForTokenClassification.from_pretrained(
            str(model), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)}, torch_dtype=torch_dtype,
            local_files_only=local_files_only, ignore_mismatched_sizes=adapter_dir is not None,
        )
    except ValueError as err:
        from .architectures import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(
            f"Cannot build a token classifier from {str(model)!r} ({getattr(config, 'model_type', '?')}): {err}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    decoder_layers(net)  # fail early with a clear error for unsupported architectures
    if adapter_dir is not None:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(adapter_dir), is_trainable=False)
        if merge:
            net = net.merge_and_unload()
    net.to(dev)
    net.eval()
    tokenizer = load_tokenizer([adapter_dir, base_dir or model], local_files_only)
    return LoadedModel(
        model=net, tokenizer=tokenizer, labels=labels,
        bidirectional=bool(label_map and label_map.get("bidirectional")), device=dev, dtype=torch_dtype,
        source={"model": str(model), "adapter": str(adapter) if adapter else None},
    )


def model_inputs(model_or_loaded: Any, input_ids: Any, attention_mask: Any, bidirectional: Optional[bool] = None) -> Dict[str, Any]:
    """Keyword arguments for ``model(**kw)``. Bidirectional models get a 4D additive mask in which every real
    token sees every other real token (transformers passes 4D masks through as they are)."""
    import torch

    if bidirectional is None:
        bidirectional = bool(getattr(model_or_loaded, "bidirectional", False))
    if not bidirectional:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    model = getattr(model_or_loaded, "model", model_or_loaded)
    dtype = next(model.parameters()).dtype
    keep = attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T): keys that are real tokens
    mask = torch.zeros(keep.shape, dtype=dtype, device=input_ids.device)
    mask = mask.masked_fill(~keep, torch.finfo(dtype).min).expand(-1, 1, input_ids.shape[1], -1)
    return {"input_ids": input_ids, "attention_mask": mask}


def forward_logits(loaded: LoadedModel, input_ids: Any, attention_mask: Any) -> Any:
    """Token-classification logits for a padded batch (B, T, num_labels)."""
    return loaded.model(**model_inputs(loaded, input_ids, attention_mask)).logits


def uses_bos(tokenizer: Any) -> bool:
    """Whether sequences start with BOS (Llama/Mistral tokenizers add one)."""
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


@dataclass
class WindowInput:
    """One model input: piece ids (BOS prepended if used) and which of its positions own which text pieces."""

    text_index: int
    ids: List[int]
    piece_start: int  # text piece index of ids[offset]
    offset: int  # 1 if BOS was prepended, else 0
    owned_start: int
    owned_end: int


def windows_for_text(tokenizer: Any, encoded: EncodedText, max_length: int, stride: int, text_index: int = 0) -> List[WindowInput]:
    """Split a text's pieces into model inputs of at most ``max_length`` ids (BOS included), overlapping by ``stride``."""
    offset = 1 if uses_bos(tokenizer) else 0
    room = max_length - offset
    if room < 1:
        raise ValueError(f"max_length={max_length} leaves no room for word pieces.")
    stride = min(stride, room - 1)
    out = []
    for w in plan_windows(len(encoded.input_ids), room, stride):
        ids = ([tokenizer.bos_token_id] if offset else []) + encoded.input_ids[w.start:w.end]
        out.append(WindowInput(text_index, ids, w.start, offset, w.owned_start, w.owned_end))
    return out


def pack_batches(lengths: Sequence[int], token_budget: int) -> List[List[int]]:
    """Group item indices, sorted by length, into batches whose padded size (rows × longest) fits ``token_budget``.

    An item longer than the budget gets a batch of its own. Linear in the number of items after sorting.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: List[List[int]] = []
    current: List[int] = []
    longest = 0
    for i in order:
        n = max(1, lengths[i])
        if current and max(longest, n) * (len(current) + 1) > token_budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def encode_windows(tokenizer: Any, items: Sequence[Tuple[str, Sequence[Tuple[int, int]]]], max_length: int,
                   stride: int) -> Tuple[List[EncodedText], List[WindowInput]]:
    """Encode each ``(text, token_spans)`` and split it into model inputs (a text without pieces gets none)."""
    encodings = encode_texts(tokenizer, items)
    windows: List[WindowInput] = []
    for i, enc in enumerate(encodings):
        if enc.input_ids:
            windows.extend(windows_for_text(tokenizer, enc, max_length, stride, i))
    return encodings, windows


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> Tuple[Any, Any]:
    """Right-pad piece id sequences to the longest: ``(input_ids, attention_mask)`` as long tensors."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.tensor([list(row) + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    return ids, mask


def padded_batches(loaded: LoadedModel, windows: Sequence[WindowInput], batch_size: int):
    """Yield ``(windows, input_ids, attention_mask)``: length-sorted batches packed under a token budget of
    ``batch_size`` pieces, right-padded and on the model's device."""
    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for batch in pack_batches([len(w.ids) for w in windows], batch_size):
        rows = [windows[i] for i in batch]
        ids, mask = pad_batch([w.ids for w in rows], pad_id)
        yield rows, ids.to(loaded.device), mask.to(loaded.device)


class PiecePredictions:
    """Best label id and probability of every word piece of every text, filled from the logits of its windows."""

    def __init__(self, encodings: Sequence[EncodedText]):
        self.encodings = encodings
        self.pred = [[0] * len(e.input_ids) for e in encodings]
        self.prob = [[0.0] * len(e.input_ids) for e in encodings]

    def add(self, rows: Sequence[WindowInput], logits: Any) -> None:
        """Record the arg-max of ``logits`` (one row per window) at the pieces each window owns."""
        import torch

        best_p, best = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        best_p, best = best_p.cpu().tolist(), best.cpu().tolist()
        for r, w in enumerate(rows):
            first = w.owned_start - w.piece_start + w.offset
            last = first + (w.owned_end - w.owned_start)
            self.pred[w.text_index][w.owned_start:w.owned_end] = best[r][first:last]
            self.prob[w.text_index][w.owned_start:w.owned_end] = best_p[r][first:last]

    def token_tags(self, labels: Sequence[str]) -> List[List[Tuple[Optional[str], float]]]:
        """Per-token ``(tag, probability)`` of each text from its first piece (``(None, 0.0)`` without one)."""
        return [
            [(None, 0.0) if p < 0 else (labels[self.pred[t][p]], self.prob[t][p]) for p in enc.first_piece]
            for t, enc in enumerate(self.encodings)
        ]


def tag_texts(loaded: LoadedModel, items: Sequence[Tuple[str, Sequence[Tuple[int, int]]]], *, max_length: int = 512,
              stride: int = 64, batch_size: int = 4096) -> List[List[Tuple[Optional[str], float]]]:
    """Per-token ``(tag, probability)`` for each ``(text, token_spans)``; ``tag`` is None for a token without a
    piece of its own. Long texts are windowed (never truncated); windows are length-sorted and packed under a
    token budget of ``batch_size`` pieces per forward pass."""
    import torch

    encodings, windows = encode_windows(loaded.tokenizer, items, max_length, stride)
    predictions = PiecePredictions(encodings)
    with torch.inference_mode():
        for rows, ids, mask in padded_batches(loaded, windows, batch_size):
            predictions.add(rows, forward_logits(loaded, ids, mask))
    return predictions.token_tags(loaded.labels)
