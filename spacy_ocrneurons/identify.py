"""Identify OCR-sensitive MLP neurons from aligned clean/noisy word pairs, with streaming statistics and CKA.

Pipeline (issue step 5, after Boros & Ehrmann, arXiv 2409.16934, done without the public code's defects):

1. **Pairs.** A :class:`SentencePair` holds a clean sentence, its noisy copy and the token alignment from
   :func:`spacy_ocrneurons.noise.noise_sentence` (noisy token ``i`` <- clean token indices). Aligned tokens are grouped
   into connected components (so splits and merges stay one unit); a group is an *altered word* when its noisy text
   differs from its clean text (:func:`altered_words`). One altered word occurrence = one clean/noisy pair.
2. **Activations.** The fine-tuned model (no profile) is run on the whole clean and the whole noisy sentence
   (``mode="context"``) or on each word alone, BOS + the word's pieces (``mode="isolated"``, the paper's setting).
   Forward hooks on the site module (``mlp.up_proj`` by default, or ``mlp.gate_proj``) gather the site output at
   the altered word's pieces only: never BOS, never padding. A word's vector is the **mean over its pieces**
   (``pooling="mean"``; ``"first"`` / ``"last"`` take one piece). A piece belongs to a word when its
   whitespace-stripped character span overlaps one of the word's tokens.
3. **Streaming statistics** (:class:`NeuronStats`, float64, fixed size: a few arrays of the MLP width per layer):
   number of pairs; rate of activation > 0 on the clean and on the noisy word; mean and sample variance of
   ``d = clean - noisy`` (batched Welford); mean ``|d|``; sign-flip rate; and an outlier counter: for one pair,
   neuron ``j`` is an outlier when ``|d_j| > mean(|d|) + z * std(|d|)`` over that pair's neurons in the layer
   (``z = 2`` by default, population std).
4. **Ranking** per layer by a stated statistic (:data:`STATISTICS`; default ``mean_abs_diff``), top-k profiles for a
   list of k, and a random-neuron control with the same layers and counts.
5. **Linear CKA** per layer between clean and noisy word vectors (:class:`StreamingCKA`), feature-space formula
   ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` from streamed sums, on at most ``cka_max_dim`` neurons
   (a seeded subsample, or a seeded Gaussian projection) so that memory stays bounded for 14336-wide MLPs.

Raw activations are never stored: each chunk of sentences is reduced into the accumulators and dropped.
"""
import datetime
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .architectures import SITES, decoder_layers, model_shape, site_module

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Ranking statistics, per neuron (higher = more OCR-sensitive).
STATISTICS = {
    "mean_abs_diff": "mean |clean - noisy| over pairs",
    "abs_mean_diff": "|mean (clean - noisy)| over pairs",
    "t_stat": "|mean d| / (std(d) / sqrt(n)), d = clean - noisy, sample std",
    "outlier_rate": "fraction of pairs where |d_j| > mean(|d|) + z*std(|d|) over the layer's neurons",
    "activation_rate_diff": "|P(clean > 0) - P(noisy > 0)|",
    "flip_rate": "fraction of pairs where the neuron is active (> 0) on exactly one of clean/noisy",
}
POOLINGS = ("mean", "first", "last")
MODES = ("context", "isolated")
CKA_METHODS = ("subsample", "projection")


# ================================================================================================
# pairs
# ================================================================================================


@dataclass
class SentencePair:
    """A clean sentence, its noisy copy and the alignment ``alignment[i]`` = clean token indices of noisy token ``i``."""

    clean_words: List[str]
    clean_spaces: List[bool]
    noisy_words: List[str]
    noisy_spaces: List[bool]
    alignment: List[List[int]]

    def __post_init__(self) -> None:
        self.alignment = [[int(a)] if isinstance(a, (int, np.integer)) else [int(j) for j in a] for a in self.alignment]
        if len(self.clean_spaces) != len(self.clean_words):
            raise ValueError(f"clean_spaces has {len(self.clean_spaces)} entries for {len(self.clean_words)} clean words.")
        if len(self.noisy_spaces) != len(self.noisy_words):
            raise ValueError(f"noisy_spaces has {len(self.noisy_spaces)} entries for {len(self.noisy_words)} noisy words.")
        if len(self.alignment) != len(self.noisy_words):
            raise ValueError(f"alignment has {len(self.alignment)} entries for {len(self.noisy_words)} noisy words.")
        for i, js in enumerate(self.alignment):
            bad = [j for j in js if not 0 <= j < len(self.clean_words)]
            if bad:
                raise ValueError(f"alignment of noisy token {i} points to clean token {bad[0]}, "
                                 f"but the clean sentence has {len(self.clean_words)} tokens.")

    @classmethod
    def from_noisy(cls, words: Sequence[str], spaces: Sequence[bool], noisy: Any) -> "SentencePair":
        """From clean words/spaces and a ``noise.NoisySentence`` (fields ``words``, ``spaces``, ``alignment``)."""
        return cls(list(words), [bool(s) for s in spaces], list(noisy.words), [bool(s) for s in noisy.spaces],
                   [list(a) if not isinstance(a, int) else [a] for a in noisy.alignment])

    def to_dict(self) -> Dict[str, Any]:
        return {"clean": {"words": self.clean_words, "spaces": self.clean_spaces},
                "noisy": {"words": self.noisy_words, "spaces": self.noisy_spaces},
                "alignment": self.alignment}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SentencePair":
        return cls(list(data["clean"]["words"]), list(data["clean"]["spaces"]), list(data["noisy"]["words"]),
                   list(data["noisy"]["spaces"]), data["alignment"])


@dataclass
class WordPair:
    """One altered word occurrence: clean token indices and noisy token indices of one aligned group."""

    sentence: int
    clean_tokens: Tuple[int, ...]
    noisy_tokens: Tuple[int, ...]
    clean_text: str
    noisy_text: str


def sentence_text(words: Sequence[str], spaces: Sequence[bool]) -> Tuple[str, List[Tuple[int, int]]]:
    """The text of a tokenized sentence and each token's (start, end) character span."""
    parts, spans, pos = [], [], 0
    for w, sp in zip(words, spaces):
        spans.append((pos, pos + len(w)))
        parts.append(w + (" " if sp else ""))
        pos += len(w) + (1 if sp else 0)
    return "".join(parts), spans


def altered_words(pair: SentencePair, sentence: int = 0) -> List[WordPair]:
    """Aligned token groups (connected components of the alignment) whose noisy text differs from the clean text.

    Noisy tokens aligned to nothing (insertions) and clean tokens aligned to nothing (deletions) have no counterpart
    and are not pairs. Groups are returned in clean-token order.
    """
    nc = len(pair.clean_words)
    parent = list(range(nc + len(pair.noisy_words)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, js in enumerate(pair.alignment):
        for j in js:
            ra, rb = find(nc + i), find(j)
            if ra != rb:
                parent[ra] = rb
    groups: Dict[int, Tuple[List[int], List[int]]] = {}
    for i, js in enumerate(pair.alignment):
        if js:
            groups.setdefault(find(nc + i), ([], []))[1].append(i)
    for j in range(nc):
        root = find(j)
        if root in groups:
            groups[root][0].append(j)
    out = []
    for clean, noisy in sorted(groups.values(), key=lambda g: (min(g[0]), min(g[1]))):
        ctext = " ".join(pair.clean_words[j] for j in sorted(clean))
        ntext = " ".join(pair.noisy_words[i] for i in sorted(noisy))
        if ctext != ntext:
            out.append(WordPair(sentence, tuple(sorted(clean)), tuple(sorted(noisy)), ctext, ntext))
    return out


def save_pairs(pairs: Iterable[SentencePair], path: PathLike) -> Path:
    """Write sentence pairs as JSON lines (``{"clean": {...}, "noisy": {...}, "alignment": [...]}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    return path


def load_pairs(path: PathLike) -> List[SentencePair]:
    """Read a JSON-lines pairs file written by :func:`save_pairs`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Pairs file not found: {path}")
    out = []
    with path.open(encoding="utf8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(SentencePair.from_dict(json.loads(line)))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{n}: not a sentence pair ({err}); expected "
                                 '{"clean": {"words", "spaces"}, "noisy": {"words", "spaces"}, "alignment"}') from None
    return out


def read_sentences(path: PathLike, column: str = "NE-COARSE-LIT") -> List[Tuple[List[str], List[str], List[bool]]]:
    """``(words, tags, spaces)`` per sentence of a HIPE ``.tsv`` or a spaCy ``.spacy`` DocBin."""
    out = []
    for words, spaces, tags, spans, _ in _read_documents(path, column):
        for a, b in spans:
            out.append((words[a:b], tags[a:b], spaces[a:b]))
    return out


def _read_documents(path: PathLike, column: str = "NE-COARSE-LIT") -> List[Tuple[List[str], List[bool], List[str],
                                                                                List[Tuple[int, int]], Any]]:
    """Per document: words, spaces, tags, sentence spans and the noise alignment if the file carries one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Data file not found: {path}")
    from . import hipe

    out = []
    if path.suffix == ".spacy":
        for doc in hipe.read_docbin(path):
            spans = ([(s.start, s.end) for s in doc.sents] if doc.has_annotation("SENT_START")
                     else ([(0, len(doc))] if len(doc) else []))
            tags = [t.ent_iob_ + "-" + t.ent_type_ if t.ent_iob_ in ("B", "I") else "O" for t in doc]
            out.append(([t.text for t in doc], [bool(t.whitespace_) for t in doc], tags, spans,
                        doc.user_data.get("ocrnoise_alignment")))
        return out
    if path.suffix in (".tsv", ".txt"):
        for doc in hipe.read_hipe_tsv(path):
            tags = hipe.repair_bio([t.get(column, "O") for t in doc.tokens], outside="O")
            out.append(([t.text for t in doc.tokens], [not t.no_space_after for t in doc.tokens], tags,
                        doc.sentence_spans(), doc.meta.get("alignment")))
        return out
    raise ValueError(f"Unsupported data file {path}: use a HIPE .tsv or a spaCy .spacy file.")


def pairs_from_documents(clean_words: Sequence[str], clean_spaces: Sequence[bool],
                         sentence_spans: Sequence[Tuple[int, int]], noisy_words: Sequence[str],
                         noisy_spaces: Sequence[bool], alignment: Sequence[Sequence[int]]) -> List[SentencePair]:
    """Split an aligned clean/noisy document into sentence pairs (noisy tokens go with the sentence of their first
    source token; tokens without a source stay with the previous noisy token's sentence)."""
    if len(alignment) != len(noisy_words):
        raise ValueError(f"alignment has {len(alignment)} entries for {len(noisy_words)} noisy tokens.")
    sent_of = {}
    for s, (a, b) in enumerate(sentence_spans):
        for j in range(a, b):
            sent_of[j] = s
    members: List[List[int]] = [[] for _ in sentence_spans]
    current = 0
    for i, src in enumerate(alignment):
        if src:
            if min(src) not in sent_of:
                raise ValueError(f"noisy token {i} is aligned to clean token {min(src)}, outside the document.")
            current = sent_of[min(src)]
        if members:
            members[current].append(i)
    out = []
    for (a, b), idx in zip(sentence_spans, members):
        if b <= a:
            continue
        out.append(SentencePair(list(clean_words[a:b]), list(clean_spaces[a:b]), [noisy_words[i] for i in idx],
                                [noisy_spaces[i] for i in idx], [[j - a for j in alignment[i] if a <= j < b] for i in idx]))
    return out


def read_aligned_pairs(clean: PathLike, noisy: Optional[PathLike] = None, *, method: str = "nlpaug",
                       level: str = "medium", seed: int = 0, column: str = "NE-COARSE-LIT",
                       progress: bool = False) -> List[SentencePair]:
    """Sentence pairs from clean data (HIPE ``.tsv`` or ``.spacy``) and its noisy copy.

    Without ``noisy`` the copy is made with the noise module exactly as ``ocrneurons noise`` makes it
    (:func:`~spacy_ocrneurons.noise.noise_hipe_docs` / :func:`~spacy_ocrneurons.noise.noise_docbin`, per-sentence
    seeds derived from ``seed``), so identification sees the same noise as the noisy evaluation files. With
    ``noisy``: a ``.spacy`` file written by the noise module, which stores the token alignment. A noisy HIPE ``.tsv``
    is refused: it has no alignment, and equal token counts do not imply a 1-1 alignment (a split and a merge in
    the same sentence cancel out).
    """
    from . import noise as noise_mod

    clean = Path(clean)
    clean_docs = _read_documents(clean, column)
    if noisy is None:
        if clean.suffix == ".spacy":
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "noisy.spacy"
                noise_mod.noise_docbin(clean, out, method=method, level=level, seed=seed, progress=progress)
                noisy_docs = _read_documents(out, column)
        else:
            from . import hipe

            docs = noise_mod.noise_hipe_docs(hipe.read_hipe_tsv(clean), method=method, level=level, seed=seed,
                                             column=column, progress=progress)
            noisy_docs = [([t.text for t in d.tokens], [not t.no_space_after for t in d.tokens], [], [],
                           d.meta["alignment"]) for d in docs]
        where = f"noise {method}/{level}"
    else:
        if Path(noisy).suffix != ".spacy":
            raise ValueError(f"--noisy {noisy}: only a .spacy file written by `ocrneurons noise` carries the token "
                             "alignment; a HIPE TSV does not. Pass that .spacy file, or omit --noisy to make the "
                             "noise here (same per-sentence seeds as `ocrneurons noise`).")
        noisy_docs = _read_documents(noisy, column)
        where = str(noisy)
    if len(noisy_docs) != len(clean_docs):
        raise ValueError(f"{where} has {len(noisy_docs)} documents but {clean} has {len(clean_docs)}.")
    out_pairs = []
    for n, ((cw, cs, _, spans, _), (nw, ns, _, _, align)) in enumerate(zip(clean_docs, noisy_docs)):
        if align is None:
            raise ValueError(f"{where}, document {n}: no token alignment (user_data['ocrnoise_alignment']); "
                             "was it written by `ocrneurons noise`?")
        out_pairs.extend(pairs_from_documents(cw, cs, spans, nw, ns, align))
    return out_pairs


def make_noisy_pairs(sentences: Iterable[Tuple[Sequence[str], Sequence[str], Sequence[bool]]], method: str = "nlpaug",
                     level: str = "medium", seed: int = 0, progress: bool = False) -> List[SentencePair]:
    """Noisy copies of in-memory sentences with :func:`spacy_ocrneurons.noise.noise_sentence` (seeded)."""
    from . import noise

    rng = random.Random(seed)
    out = []
    sentences = list(sentences)
    for words, tags, spaces in _progress(sentences, progress, desc=f"noise ({method}, {level})", unit="sent"):
        if not words:
            continue
        noisy = noise.noise_sentence(list(words), list(tags), list(spaces), method=method, level=level, rng=rng)
        out.append(SentencePair.from_noisy(words, spaces, noisy))
    return out


# ================================================================================================
# activations
# ================================================================================================


def word_pieces(offsets: Sequence[Tuple[int, int]], text: str, spans: Sequence[Tuple[int, int]]) -> List[int]:
    """Indices of the pieces whose whitespace-stripped span overlaps one of ``spans`` (in piece order)."""
    from .alignment import strip_piece_spans

    out = []
    for p, (ps, pe) in enumerate(strip_piece_spans(text, offsets)):
        if pe > ps and any(ps < te and pe > ts for ts, te in spans):
            out.append(p)
    return out


def _pool(pieces: List[int], pooling: str) -> List[int]:
    if pooling == "mean":
        return pieces
    if pooling == "first":
        return pieces[:1]
    return pieces[-1:]


@dataclass
class ActivationBatch:
    """Site outputs of one chunk of altered words: ``activations[layer] = (clean, noisy)``, each (n_words, width)."""

    words: List[WordPair]
    activations: Dict[int, Tuple[np.ndarray, np.ndarray]]
    skipped: int = 0  # altered words with no piece of their own on one side


class _StopForward(Exception):
    """Raised by the last needed hook to skip the layers above it."""


@dataclass
class _Side:
    """Model inputs of one side (clean or noisy) of a chunk: sequences and what to gather from them."""

    seqs: List[List[int]] = field(default_factory=list)
    gathers: List[List[Tuple[int, int]]] = field(default_factory=list)  # per sequence: (position, item)


def _model_device(loaded: Any) -> Any:
    dev = getattr(loaded, "device", None)
    if dev is None:
        dev = next(loaded.model.parameters()).device
    return dev


def _add_text(side: _Side, tokenizer: Any, text: str, token_spans: List[Tuple[int, int]],
              groups: List[Tuple[int, List[Tuple[int, int]]]], pooling: str, max_length: int, stride: int
              ) -> Dict[int, int]:
    """Queue one text (windowed) and the items to gather from it; returns item -> number of pieces gathered."""
    from .alignment import encode_text
    from .modeling import windows_for_text

    enc = encode_text(tokenizer, text, token_spans)
    if not enc.input_ids:
        return {}
    item_pieces = {}
    for item, spans in groups:
        pieces = _pool(word_pieces(enc.offsets, text, spans), pooling)
        if pieces:
            item_pieces[item] = pieces
    if not item_pieces:
        return {}
    windows = windows_for_text(tokenizer, enc, max_length, stride)
    owner = {}
    for w_i, w in enumerate(windows):
        for p in range(w.owned_start, w.owned_end):
            owner[p] = w_i
    used = sorted({owner[p] for pieces in item_pieces.values() for p in pieces})
    local = {}
    for w_i in used:
        local[w_i] = len(side.seqs)
        side.seqs.append(windows[w_i].ids)
        side.gathers.append([])
    for item, pieces in item_pieces.items():
        for p in pieces:
            w = windows[owner[p]]
            side.gathers[local[owner[p]]].append((p - w.piece_start + w.offset, item))
    return {item: len(p) for item, p in item_pieces.items()}


def _run_side(loaded: Any, side: _Side, n_items: int, layers: Sequence[int], site: str, batch_size: int,
              counts: np.ndarray) -> Dict[int, np.ndarray]:
    """Forward all sequences of one side; mean of the gathered site outputs per item, per layer (float32)."""
    import torch

    from .modeling import model_inputs, pack_batches, pad_batch

    model = loaded.model
    tok = loaded.tokenizer
    device = _model_device(loaded)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = model_shape(model)["intermediate_size"]
    sums = {layer: torch.zeros((n_items, width), dtype=torch.float32) for layer in layers}
    state: Dict[str, Any] = {}
    last = max(layers)

    def make_hook(layer: int):
        def hook(module, inputs, output):
            sel = output[state["rows"], state["pos"]].float().cpu()
            sums[layer].index_add_(0, state["items"], sel)
            if layer == last and state.get("stop", True):
                raise _StopForward()
        return hook

    handles = [site_module(model, layer, site).register_forward_hook(make_hook(layer)) for layer in layers]
    try:
        with torch.inference_mode():
            for batch in pack_batches([len(s) for s in side.seqs], batch_size):
                rows_, pos_, items_ = [], [], []
                for r, s in enumerate(batch):
                    for pos, item in side.gathers[s]:
                        rows_.append(r)
                        pos_.append(pos)
                        items_.append(item)
                if not rows_:
                    continue
                ids, mask = pad_batch([side.seqs[s] for s in batch], pad_id)
                state["rows"] = torch.tensor(rows_, dtype=torch.long, device=device)
                state["pos"] = torch.tensor(pos_, dtype=torch.long, device=device)
                state["items"] = torch.tensor(items_, dtype=torch.long)
                try:
                    model(**model_inputs(loaded, ids.to(device), mask.to(device)))
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    denom = torch.from_numpy(np.maximum(counts, 1).astype(np.float32))[:, None]
    return {layer: (sums[layer] / denom).numpy() for layer in layers}


def _chunks(pairs: Iterable[SentencePair], max_words: int) -> Iterator[List[Tuple[int, SentencePair, List[WordPair]]]]:
    chunk, n = [], 0
    for s, pair in enumerate(pairs):
        words = altered_words(pair, s)
        if not words:
            continue
        chunk.append((s, pair, words))
        n += len(words)
        if n >= max_words:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def collect_pair_activations(loaded: Any, pairs: Iterable[SentencePair], site: str = "mlp.up_proj",
                             mode: str = "context", batch_size: int = 4096, *, layers: Optional[Sequence[int]] = None,
                             pooling: str = "mean", max_length: int = 512, stride: int = 64,
                             chunk_words: int = 128) -> Iterator[ActivationBatch]:
    """Yield site outputs at altered words, chunk by chunk (about ``chunk_words`` words each).

    ``loaded`` is a :class:`~spacy_ocrneurons.modeling.LoadedModel` (or anything with ``model``, ``tokenizer``,
    ``bidirectional``, ``device``). ``mode="context"`` runs whole clean and noisy sentences (windowed when longer than
    ``max_length``), ``"isolated"`` runs each word alone (BOS + its pieces). ``batch_size`` is the token budget of
    one forward pass (rows x longest sequence). Only real pieces of the word are gathered, never BOS or padding;
    ``pooling`` = ``mean`` (over the word's pieces), ``first`` or ``last`` piece.
    """
    if site not in SITES:
        raise ValueError(f"Unknown site {site!r}; valid sites: {sorted(SITES)}.")
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; use one of {MODES}.")
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; use one of {POOLINGS}.")
    n_layers = len(decoder_layers(loaded.model))
    layers = list(range(n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    if not layers:
        raise ValueError("No layers selected.")
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"Layer {bad[0]} does not exist; the model has {n_layers} decoder layers (0-{n_layers - 1}).")
    tok = loaded.tokenizer
    for chunk in _chunks(pairs, chunk_words):
        items: List[WordPair] = [w for _, _, words in chunk for w in words]
        clean, noisy = _Side(), _Side()
        n = len(items)
        c_counts, n_counts = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        item = 0
        for _, pair, words in chunk:
            ctext, cspans = sentence_text(pair.clean_words, pair.clean_spaces)
            ntext, nspans = sentence_text(pair.noisy_words, pair.noisy_spaces)
            ids = list(range(item, item + len(words)))
            item += len(words)
            if mode == "context":
                cg = [(i, [cspans[j] for j in w.clean_tokens]) for i, w in zip(ids, words)]
                ng = [(i, [nspans[j] for j in w.noisy_tokens]) for i, w in zip(ids, words)]
                for i, c in _add_text(clean, tok, ctext, cspans, cg, pooling, max_length, stride).items():
                    c_counts[i] = c
                for i, c in _add_text(noisy, tok, ntext, nspans, ng, pooling, max_length, stride).items():
                    n_counts[i] = c
            else:
                for i, w in zip(ids, words):
                    for side, counts, text, spans, toks in (
                        (clean, c_counts, ctext, cspans, w.clean_tokens), (noisy, n_counts, ntext, nspans, w.noisy_tokens)
                    ):
                        start, end = spans[toks[0]][0], spans[toks[-1]][1]
                        word = text[start:end]
                        wspans = [(spans[t][0] - start, spans[t][1] - start) for t in toks]
                        got = _add_text(side, tok, word, wspans, [(i, wspans)], pooling, max_length, stride)
                        counts[i] = got.get(i, 0)
        c_acts = _run_side(loaded, clean, n, layers, site, batch_size, c_counts)
        n_acts = _run_side(loaded, noisy, n, layers, site, batch_size, n_counts)
        keep = np.flatnonzero((c_counts > 0) & (n_counts > 0))
        yield ActivationBatch(
            words=[items[i] for i in keep],
            activations={layer: (c_acts[layer][keep], n_acts[layer][keep]) for layer in layers},
            skipped=int(n - len(keep)),
        )


# ================================================================================================
# streaming statistics
# ================================================================================================

_ACCUMULATORS = ("mean_d", "m2_d", "sum_abs_d", "pos_clean", "pos_noisy", "outliers", "flips", "sum_clean", "sum_noisy")


class NeuronStats:
    """Streaming per-layer, per-neuron statistics of clean vs noisy activations (float64, fixed size).

    Memory is ``len(_ACCUMULATORS) * width * 8`` bytes per layer, independent of the number of pairs.
    """

    def __init__(self, width: int, layers: Sequence[int], z: float = 2.0):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = int(width)
        self.layers = sorted(set(int(l) for l in layers))
        self.z = float(z)
        self.n = {l: 0 for l in self.layers}
        self.acc = {l: {name: np.zeros(self.width, dtype=np.float64) for name in _ACCUMULATORS} for l in self.layers}

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (constant once constructed)."""
        return sum(a.nbytes for per in self.acc.values() for a in per.values())

    def _check(self, layer: int, clean: np.ndarray, noisy: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if layer not in self.acc:
            raise KeyError(f"Layer {layer} is not tracked (tracked layers: {self.layers}).")
        clean = np.asarray(clean, dtype=np.float64)
        noisy = np.asarray(noisy, dtype=np.float64)
        if clean.ndim != 2 or clean.shape != noisy.shape or clean.shape[1] != self.width:
            raise ValueError(f"Layer {layer}: expected clean and noisy arrays of shape (n, {self.width}), "
                             f"got {clean.shape} and {noisy.shape}.")
        return clean, noisy

    def update(self, layer: int, clean_acts: np.ndarray, noisy_acts: np.ndarray) -> None:
        """Add a batch of pairs: row ``i`` of ``clean_acts`` and ``noisy_acts`` is one clean/noisy word pair."""
        clean, noisy = self._check(layer, clean_acts, noisy_acts)
        b = clean.shape[0]
        if b == 0:
            return
        a = self.acc[layer]
        d = clean - noisy
        n0 = self.n[layer]
        n1 = n0 + b
        mean_b = d.mean(axis=0)
        m2_b = ((d - mean_b) ** 2).sum(axis=0)
        delta = mean_b - a["mean_d"]
        a["mean_d"] += delta * (b / n1)
        a["m2_d"] += m2_b + delta ** 2 * (n0 * b / n1)
        absd = np.abs(d)
        a["sum_abs_d"] += absd.sum(axis=0)
        cpos, npos = clean > 0, noisy > 0
        a["pos_clean"] += cpos.sum(axis=0)
        a["pos_noisy"] += npos.sum(axis=0)
        a["flips"] += (cpos != npos).sum(axis=0)
        thr = absd.mean(axis=1) + self.z * absd.std(axis=1)
        a["outliers"] += (absd > thr[:, None]).sum(axis=0)
        a["sum_clean"] += clean.sum(axis=0)
        a["sum_noisy"] += noisy.sum(axis=0)
        self.n[layer] = n1

    def statistic(self, layer: int, name: str = "mean_abs_diff") -> np.ndarray:
        """One per-neuron statistic of ``layer`` (see :data:`STATISTICS`, plus ``mean_diff``, ``var_diff``,
        ``rate_clean``, ``rate_noisy``, ``mean_clean``, ``mean_noisy``)."""
        if layer not in self.acc:
            raise KeyError(f"Layer {layer} is not tracked (tracked layers: {self.layers}).")
        a, n = self.acc[layer], self.n[layer]
        if n == 0:
            return np.zeros(self.width)
        if name == "mean_diff":
            return a["mean_d"].copy()
        if name == "var_diff":
            return a["m2_d"] / (n - 1) if n > 1 else np.zeros(self.width)
        if name == "mean_abs_diff":
            return a["sum_abs_d"] / n
        if name == "abs_mean_diff":
            return np.abs(a["mean_d"])
        if name == "t_stat":
            if n < 2:
                return np.zeros(self.width)
            se = np.sqrt(a["m2_d"] / (n - 1) / n)
            m = np.abs(a["mean_d"])
            out = np.zeros(self.width)
            pos = se > 0
            out[pos] = m[pos] / se[pos]
            out[~pos & (m > 0)] = np.inf
            return out
        if name == "outlier_rate":
            return a["outliers"] / n
        if name == "rate_clean":
            return a["pos_clean"] / n
        if name == "rate_noisy":
            return a["pos_noisy"] / n
        if name == "activation_rate_diff":
            return np.abs(a["pos_clean"] - a["pos_noisy"]) / n
        if name == "flip_rate":
            return a["flips"] / n
        if name == "mean_clean":
            return a["sum_clean"] / n
        if name == "mean_noisy":
            return a["sum_noisy"] / n
        raise ValueError(f"Unknown statistic {name!r}; ranking statistics: {sorted(STATISTICS)}.")

    def rank(self, layer: int, statistic: str = "mean_abs_diff") -> np.ndarray:
        """Neuron indices of ``layer`` from most to least sensitive (ties: lower index first)."""
        if statistic not in STATISTICS:
            raise ValueError(f"Unknown ranking statistic {statistic!r}; use one of {sorted(STATISTICS)}.")
        return np.argsort(-self.statistic(layer, statistic), kind="stable")

    def top_k(self, layer: int, k: int, statistic: str = "mean_abs_diff") -> List[int]:
        """The ``k`` highest-ranked neurons of ``layer`` (sorted by index)."""
        return sorted(int(i) for i in self.rank(layer, statistic)[:k])

    _DERIVED = ("mean_diff", "var_diff", "mean_abs_diff", "abs_mean_diff", "t_stat", "outlier_rate", "rate_clean",
                "rate_noisy", "activation_rate_diff", "flip_rate", "mean_clean", "mean_noisy")

    def to_dict(self) -> Dict[str, np.ndarray]:
        """Arrays for saving: ``layers``, ``n``, ``z``, the raw accumulators and the derived statistics, each
        (n_layers, width) in the order of ``layers``. Summaries of activations, never raw activations."""
        out: Dict[str, np.ndarray] = {
            "layers": np.array(self.layers, dtype=np.int64),
            "n": np.array([self.n[l] for l in self.layers], dtype=np.int64),
            "z": np.array(self.z),
            "width": np.array(self.width),
        }
        for name in _ACCUMULATORS:
            out["acc_" + name] = np.stack([self.acc[l][name] for l in self.layers])
        for name in self._DERIVED:
            out[name] = np.stack([self.statistic(l, name) for l in self.layers])
        return out

    def save(self, path: PathLike, prefix: str = "") -> Path:
        """Write :meth:`to_dict` to a compressed ``.npz`` (keys prefixed with ``prefix``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{prefix + k: v for k, v in self.to_dict().items()})
        return path

    @classmethod
    def from_dict(cls, data: Dict[str, np.ndarray], prefix: str = "") -> "NeuronStats":
        """Rebuild accumulators (to continue streaming or re-rank) from :meth:`to_dict` arrays."""
        layers = [int(l) for l in data[prefix + "layers"]]
        stats = cls(int(data[prefix + "width"]), layers, float(data[prefix + "z"]))
        for i, l in enumerate(layers):
            stats.n[l] = int(data[prefix + "n"][i])
            for name in _ACCUMULATORS:
                stats.acc[l][name] = np.array(data[prefix + "acc_" + name][i], dtype=np.float64)
        return stats

    @classmethod
    def load(cls, path: PathLike, prefix: str = "") -> "NeuronStats":
        with np.load(Path(path)) as data:
            return cls.from_dict({k: data[k] for k in data.files}, prefix)


class StreamingCKA:
    """Linear CKA between clean (X) and noisy (Y) activations per layer, from streamed sums (float64).

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)`` with ``Xc^T Xc = X^T X - n mu_x mu_x^T`` etc.
    Wider layers than ``max_dim`` are reduced first, identically for X and Y and for every layer: ``subsample``
    keeps ``max_dim`` neurons drawn without replacement (seeded), ``projection`` multiplies by a seeded Gaussian
    ``width x max_dim`` matrix. Memory: three ``dim x dim`` float64 matrices per layer.
    """

    def __init__(self, width: int, layers: Sequence[int], max_dim: Optional[int] = 1024, method: str = "subsample",
                 seed: int = 0):
        if method not in CKA_METHODS:
            raise ValueError(f"Unknown CKA method {method!r}; use one of {CKA_METHODS}.")
        self.width = int(width)
        self.layers = sorted(set(int(l) for l in layers))
        self.seed = int(seed)
        self.reduced = bool(max_dim) and self.width > int(max_dim)
        self.method = method if self.reduced else "all"
        self.dim = int(max_dim) if self.reduced else self.width
        rng = np.random.default_rng(seed)
        self.index: Optional[np.ndarray] = None
        self.projection: Optional[np.ndarray] = None
        if self.reduced and method == "subsample":
            self.index = np.sort(rng.choice(self.width, size=self.dim, replace=False))
        elif self.reduced:
            self.projection = rng.standard_normal((self.width, self.dim)) / math.sqrt(self.dim)
        self.n = {l: 0 for l in self.layers}
        self.sx = {l: np.zeros(self.dim) for l in self.layers}
        self.sy = {l: np.zeros(self.dim) for l in self.layers}
        self.sxx = {l: np.zeros((self.dim, self.dim)) for l in self.layers}
        self.syy = {l: np.zeros((self.dim, self.dim)) for l in self.layers}
        self.syx = {l: np.zeros((self.dim, self.dim)) for l in self.layers}

    def _reduce(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.width:
            raise ValueError(f"expected an array of shape (n, {self.width}), got {a.shape}")
        if self.index is not None:
            return a[:, self.index]
        if self.projection is not None:
            return a @ self.projection
        return a

    def update(self, layer: int, clean_acts: np.ndarray, noisy_acts: np.ndarray) -> None:
        """Add rows of paired clean (X) and noisy (Y) activations."""
        if layer not in self.n:
            raise KeyError(f"Layer {layer} is not tracked (tracked layers: {self.layers}).")
        x, y = self._reduce(clean_acts), self._reduce(noisy_acts)
        if x.shape != y.shape:
            raise ValueError(f"Layer {layer}: clean {x.shape} and noisy {y.shape} shapes differ.")
        self.n[layer] += x.shape[0]
        self.sx[layer] += x.sum(axis=0)
        self.sy[layer] += y.sum(axis=0)
        self.sxx[layer] += x.T @ x
        self.syy[layer] += y.T @ y
        self.syx[layer] += y.T @ x

    def cka(self, layer: int) -> float:
        """Linear CKA of ``layer`` (NaN with fewer than 2 pairs or a constant side)."""
        n = self.n[layer]
        if n < 2:
            return float("nan")
        mx, my = self.sx[layer] / n, self.sy[layer] / n
        cxx = self.sxx[layer] - n * np.outer(mx, mx)
        cyy = self.syy[layer] - n * np.outer(my, my)
        cyx = self.syx[layer] - n * np.outer(my, mx)
        den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
        if not den > 0:
            return float("nan")
        return float(np.linalg.norm(cyx) ** 2 / den)

    def result(self) -> Dict[int, float]:
        return {l: self.cka(l) for l in self.layers}

    def describe(self) -> Dict[str, Any]:
        """How CKA was computed (for the metrics file)."""
        return {"formula": "linear CKA, feature space: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)",
                "method": self.method, "dim": self.dim, "width": self.width,
                "seed": self.seed if self.reduced else None}


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (n, d) matrices computed directly (reference; holds both in memory)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


# ================================================================================================
# identification
# ================================================================================================


def parse_layers(spec: Optional[str], num_layers: int) -> List[int]:
    """``"0-5,25-31"`` -> layer list (``None``/``"all"`` = every layer); checked against ``num_layers``."""
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(range(num_layers))
    out = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"Bad layer range {part!r} in {spec!r}: use e.g. '0-5,25-31'.") from None
    bad = sorted(l for l in out if not 0 <= l < num_layers)
    if bad:
        raise ValueError(f"Layer {bad[0]} in {spec!r} does not exist; the model has {num_layers} layers (0-{num_layers - 1}).")
    return sorted(out)


def parse_k(spec: Union[str, int, float, Sequence[Any]]) -> List[Union[int, float]]:
    """``"5,10,20"`` -> [5, 10, 20]; fractions of the layer width as ``0.01`` or ``1%``."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out: List[Union[int, float]] = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        try:
            if s.endswith("%"):
                v: Union[int, float] = float(s[:-1]) / 100.0
            elif isinstance(item, float) or "." in s or "e" in s.lower():
                v = float(s)
            else:
                v = int(s)
        except ValueError:
            raise ValueError(f"Bad k {s!r}: use integers (neurons per layer) or fractions like 0.01 / 1%.") from None
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"Bad k {s!r}: a fraction must be in (0, 1).")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"Bad k {s!r}: must be >= 1.")
        out.append(v)
    if not out:
        raise ValueError(f"No k given in {spec!r}.")
    return out


def resolve_k(k: Union[int, float], width: int) -> int:
    """Neurons per layer for a k spec: an int (capped at ``width``) or a fraction of ``width`` (at least 1)."""
    if isinstance(k, float):
        return max(1, min(width, int(round(k * width))))
    return min(int(k), width)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def _progress(it: Iterable[Any], enabled: bool, **kw: Any) -> Iterable[Any]:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def _finite(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


def sensitive_counts(stats: NeuronStats, statistic: str, z: float = 2.0) -> Dict[int, int]:
    """Per layer: neurons whose ``statistic`` exceeds the layer's mean + ``z`` * std of that statistic."""
    out = {}
    for l in stats.layers:
        values = stats.statistic(l, statistic)
        finite = values[np.isfinite(values)]
        if stats.n[l] == 0 or finite.size == 0:
            out[l] = 0
            continue
        out[l] = int((values > finite.mean() + z * finite.std()).sum())
    return out


def plot_cka_by_layer(cka: Dict[str, Dict[int, float]], path: PathLike, title: str = "") -> Path:
    """Line plot of CKA(clean, noisy) per layer, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    for mode, values in cka.items():
        layers = sorted(values)
        ax.plot(layers, [np.nan if values[l] is None else values[l] for l in layers], marker="o", label=mode)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("linear CKA (clean vs noisy)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "CKA between clean and noisy word activations by layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sensitive_neurons(counts: Dict[int, int], topk_means: Dict[int, Dict[int, float]], path: PathLike,
                           statistic: str, z: float = 2.0) -> Path:
    """Bars: neurons per layer whose statistic exceeds mean + z*std; lines: mean statistic of the top-k neurons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    layers = sorted(counts)
    ax1.bar(layers, [counts[l] for l in layers], color="tab:red")
    ax1.set_ylabel(f"# neurons > mean+{z:g}std")
    ax1.set_title(f"OCR-sensitive neurons by layer ({statistic})")
    ax1.grid(axis="y", alpha=0.3)
    for k, values in sorted(topk_means.items()):
        ls = sorted(values)
        ax2.plot(ls, [np.nan if values[l] is None else values[l] for l in ls], marker=".", label=f"top-{k}")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_xlabel("decoder layer")
    ax2.set_ylabel(f"mean {statistic} of top-k")
    ax2.grid(alpha=0.3)
    if topk_means:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def identify(loaded: Any, pairs: Sequence[SentencePair], ks: Union[str, Sequence[Any]] = (10,), *,
             site: str = "mlp.up_proj", layers: Optional[Sequence[int]] = None,
             modes: Sequence[str] = MODES, rank_mode: str = "context", statistic: str = "mean_abs_diff",
             pooling: str = "mean", z: float = 2.0, sensitive_z: float = 2.0, batch_size: int = 4096,
             max_length: int = 512, stride: int = 64, chunk_words: int = 128, cka_max_dim: Optional[int] = 1024,
             cka_method: str = "subsample", seed: int = 0, factor: float = 0.5, name: str = "ocr-sensitive",
             profiles_dir: Optional[PathLike] = None, metrics_path: Optional[PathLike] = None,
             plots_dir: Optional[PathLike] = None, stats_path: Optional[PathLike] = None,
             provenance: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    """Identify OCR-sensitive neurons per layer and write profiles, a random control, statistics, metrics and plots.

    Neurons are ranked per layer by ``statistic`` computed in ``rank_mode`` (``context`` by default); for each k in
    ``ks`` a profile ``<profiles_dir>/<name>-k<K>.json`` keeps the top-K neurons of every selected layer, and
    ``<name>-k<K>-random.json`` the random control (same layers and counts, seeded with ``seed``). Returns the
    summary written to ``metrics_path`` (per-layer CKA for each mode, pair counts, sensitive-neuron counts, paths),
    plus two in-memory-only keys: ``_stats`` (mode -> :class:`NeuronStats`) and ``_profiles`` (per k: paths, or the
    profile objects when ``profiles_dir`` is None). ``stats_path`` gets an ``.npz`` with ``<mode>__<array>`` keys
    (see :meth:`NeuronStats.to_dict`; reload with ``NeuronStats.load(path, prefix="context__")``).
    """
    from .profile import NeutralizationProfile

    if statistic not in STATISTICS:
        raise ValueError(f"Unknown ranking statistic {statistic!r}; use one of {sorted(STATISTICS)}.")
    modes = list(dict.fromkeys(modes))
    for m in modes:
        if m not in MODES:
            raise ValueError(f"Unknown mode {m!r}; use one of {MODES}.")
    if rank_mode not in modes:
        raise ValueError(f"rank_mode {rank_mode!r} must be one of the modes run ({modes}).")
    k_specs = parse_k(ks)
    pairs = list(pairs)
    model = loaded.model
    shape = model_shape(model)
    width = shape["intermediate_size"]
    n_layers = shape["num_hidden_layers"]
    layers = list(range(n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    n_words = sum(len(altered_words(p, s)) for s, p in enumerate(pairs))
    if n_words == 0:
        raise ValueError(f"No altered words in {len(pairs)} sentence pairs: nothing to compare (is the noise level 0?).")

    stats: Dict[str, NeuronStats] = {}
    ckas: Dict[str, StreamingCKA] = {}
    skipped: Dict[str, int] = {}
    for mode in modes:
        st = NeuronStats(width, layers, z=z)
        ck = StreamingCKA(width, layers, max_dim=cka_max_dim, method=cka_method, seed=seed)
        skipped[mode] = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_words, desc=f"identify [{mode}]", unit="word")
        for batch in collect_pair_activations(loaded, pairs, site, mode, batch_size, layers=layers, pooling=pooling,
                                              max_length=max_length, stride=stride, chunk_words=chunk_words):
            for layer, (c, n) in batch.activations.items():
                st.update(layer, c, n)
                ck.update(layer, c, n)
            skipped[mode] += batch.skipped
            if bar is not None:
                bar.update(len(batch.words) + batch.skipped)
        if bar is not None:
            bar.close()
        stats[mode], ckas[mode] = st, ck

    ranked = stats[rank_mode]
    n_pairs = {m: int(stats[m].n[layers[0]]) for m in modes}
    if n_pairs[rank_mode] == 0:
        raise ValueError(f"No altered word had pieces on both sides in {rank_mode} mode; nothing to rank.")
    created = _now()
    base_prov = {
        "method": f"{statistic} top-k per layer",
        "statistic": statistic,
        "statistic_definition": STATISTICS[statistic],
        "context_mode": rank_mode,
        "pooling": pooling,
        "outlier_z": z,
        "n_pairs": n_pairs[rank_mode],
        "n_sentences": len(pairs),
        "created": created,
    }
    base_prov.update(provenance or {})

    profile_paths: List[Dict[str, Any]] = []
    topk_means: Dict[int, Dict[int, float]] = {}
    seen_k = set()
    for spec in k_specs:
        k = resolve_k(spec, width)
        if k in seen_k:
            continue
        seen_k.add(k)
        neurons = {l: ranked.top_k(l, k, statistic) for l in layers}
        vals = {}
        for l in layers:
            s = ranked.statistic(l, statistic)
            vals[l] = _finite(float(np.mean(s[neurons[l]])))
        topk_means[k] = vals
        prov = dict(base_prov, k=k, k_spec=str(spec))
        profile = NeutralizationProfile(neurons=neurons, factor=factor, site=site, model=dict(shape), provenance=prov)
        control = profile.random_control(width, seed=seed)
        entry: Dict[str, Any] = {"k": k, "k_spec": str(spec)}
        if profiles_dir is not None:
            pdir = Path(profiles_dir)
            entry["profile"] = str(profile.save(pdir / f"{name}-k{k}.json"))
            entry["random_control"] = str(control.save(pdir / f"{name}-k{k}-random.json"))
        else:
            entry["profile_obj"], entry["random_control_obj"] = profile, control
        profile_paths.append(entry)

    counts = sensitive_counts(ranked, statistic, sensitive_z)
    cka = {m: {l: _finite(v) for l, v in ckas[m].result().items()} for m in modes}
    summary: Dict[str, Any] = {
        "format": "spacy-ocrneurons/identify",
        "created": created,
        "model": shape,
        "site": site,
        "layers": layers,
        "modes": modes,
        "rank_mode": rank_mode,
        "statistic": statistic,
        "statistic_definition": STATISTICS[statistic],
        "pooling": pooling,
        "outlier_z": z,
        "n_sentences": len(pairs),
        "n_altered_words": n_words,
        "n_pairs": n_pairs,
        "skipped_no_pieces": skipped,
        "cka": {m: {str(l): v for l, v in cka[m].items()} for m in modes},
        "cka_method": ckas[modes[0]].describe(),
        "sensitive_threshold": f"{statistic} > layer mean + {sensitive_z:g} * layer std",
        "sensitive_counts": {str(l): c for l, c in counts.items()},
        "topk_mean_statistic": {str(k): {str(l): v for l, v in vals.items()} for k, vals in topk_means.items()},
        "per_layer_mean_statistic": {str(l): _finite(float(np.mean(ranked.statistic(l, statistic)))) for l in layers},
        "profiles": [{k: v for k, v in e.items() if not k.endswith("_obj")} for e in profile_paths],
        "provenance": base_prov,
        "stats_bytes": {m: stats[m].nbytes for m in modes},
    }
    if stats_path is not None:
        stats_path = Path(stats_path)
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        arrays: Dict[str, np.ndarray] = {"site": np.array(site), "statistic": np.array(statistic)}
        for m in modes:
            arrays.update({f"{m}__{k}": v for k, v in stats[m].to_dict().items()})
        np.savez_compressed(stats_path, **arrays)
        summary["stats"] = str(stats_path)
    if plots_dir is not None:
        pdir = Path(plots_dir)
        summary["plots"] = {
            "cka_by_layer": str(plot_cka_by_layer(cka, pdir / "cka_by_layer.png")),
            "sensitive_neurons_by_layer": str(plot_sensitive_neurons(counts, topk_means, pdir / "sensitive_neurons_by_layer.png",
                                                                     statistic, sensitive_z)),
        }
    if metrics_path is not None:
        metrics_path = Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf8")
        summary["metrics"] = str(metrics_path)
    summary["_stats"] = stats  # in-memory only (not written)
    summary["_profiles"] = profile_paths
    return summary
