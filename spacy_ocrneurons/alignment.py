"""Word-piece ↔ spaCy-token alignment, windowing over word pieces, and BIO decoding with repair.

We align with the fast tokenizer's character offsets, not spacy-transformers' alignment: with
SentencePiece/Metaspace tokenizers (Llama, Mistral) a piece such as ``▁Paris`` carries the offset of the
*preceding space*, and spacy-transformers aligns each token to the next word's first piece as well
(spaCy issue 13730). Here a piece's span is first stripped of leading whitespace, and a token's
*first piece* is the first piece whose stripped span overlaps the token.

The same encoding serves training and inference, so labels are always learned and read on the same pieces.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from spacy.util import registry

from .hipe import bio_spans, repair_bio

IGNORE_INDEX = -100


@dataclass
class EncodedText:
    """Word pieces of one text and their alignment to its tokens.

    ``first_piece[t]`` is the index (in ``input_ids``) of token ``t``'s first piece, or -1 when the token has no
    piece of its own (whitespace tokens, or a token whose characters sit inside a piece that began in an earlier
    token, e.g. ``.`` in the piece ``▁Paris.``).
    """

    input_ids: List[int]
    offsets: List[Tuple[int, int]]
    first_piece: List[int]


def strip_piece_spans(text: str, offsets: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Piece spans with leading whitespace removed (Metaspace pieces include the space before a word)."""
    out = []
    for start, end in offsets:
        while start < end and text[start].isspace():
            start += 1
        out.append((start, end))
    return out


def align_first_pieces(text: str, token_spans: Sequence[Tuple[int, int]],
                       offsets: Sequence[Tuple[int, int]]) -> List[int]:
    """Index of each token's first piece (-1 if none), in one linear pass over tokens and pieces.

    ``token_spans`` are (start_char, end_char) of the tokens in order; ``offsets`` the pieces' character offsets.
    A token owns a piece when the piece's whitespace-stripped start lies inside the token; a token that owns none
    gets -1 (its label is decided by its neighbours, see :func:`decode_bio`).
    """
    spans = strip_piece_spans(text, offsets)
    first = [-1] * len(token_spans)
    p = 0
    n = len(spans)
    for t, (ts, te) in enumerate(token_spans):
        while p < n and (spans[p][1] <= spans[p][0] or spans[p][0] < ts):  # empty pieces, or pieces before token
            p += 1
        if p < n and ts <= spans[p][0] < te:
            first[t] = p
    return first


def encode_text(tokenizer: Any, text: str, token_spans: Sequence[Tuple[int, int]]) -> EncodedText:
    """Tokenize ``text`` once (no special tokens) and align pieces to ``token_spans``."""
    return encode_texts(tokenizer, [(text, token_spans)])[0]


def encode_texts(tokenizer: Any, items: Sequence[Tuple[str, Sequence[Tuple[int, int]]]]) -> List[EncodedText]:
    """:func:`encode_text` for many ``(text, token_spans)`` at once (one batched call to the fast tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: spacy-ocrneurons needs character offsets "
            "(save the tokenizer with `tokenizers`/`PreTrainedTokenizerFast`, i.e. a tokenizer.json)."
        )
    texts = [text for text, _ in items]
    nonempty = [i for i, t in enumerate(texts) if t]
    out = [EncodedText([], [], [-1] * len(spans)) for _, spans in items]
    if nonempty:
        enc = tokenizer([texts[i] for i in nonempty], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False)
        for j, i in enumerate(nonempty):
            offsets = [tuple(o) for o in enc["offset_mapping"][j]]
            out[i] = EncodedText(list(enc["input_ids"][j]), offsets, align_first_pieces(texts[i], items[i][1], offsets))
    return out


@dataclass
class Window:
    """A slice ``[start, end)`` of a text's pieces, fed to the model as one sequence (BOS prepended if used)."""

    doc_index: int
    start: int
    end: int
    owned_start: int  # pieces [owned_start, owned_end) take their labels from this window
    owned_end: int


@registry.misc("ocrneurons.windows.v1")
def make_window_strategy() -> Any:
    """Registered strategy: windows of ``max_length`` pieces overlapping by ``stride``; each piece is read from
    the window where it has the most left context (the earliest window that contains it)."""
    return plan_windows


def plan_windows(n_pieces: int, max_length: int, stride: int, doc_index: int = 0) -> List[Window]:
    """Cover ``n_pieces`` with windows of at most ``max_length`` pieces overlapping by ``stride`` pieces.

    Since the model reads left to right, a piece has the most left context in the *earliest* window that holds it,
    so each window owns the pieces from where the previous one ended. Nothing is ever dropped.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 0 <= stride < max_length:
        raise ValueError(f"stride must be in [0, max_length), got stride={stride}, max_length={max_length}")
    windows: List[Window] = []
    start = 0
    owned_start = 0
    while True:
        end = min(start + max_length, n_pieces)
        windows.append(Window(doc_index, start, end, owned_start, end))
        if end >= n_pieces:
            break
        owned_start = end
        start = end - stride
    return windows


def fill_unowned(tags: Sequence[Optional[str]]) -> List[str]:
    """Tags for tokens without a piece of their own (``None``): ``I-X`` when both neighbours belong to the same
    entity X (the next one continuing it with ``I-X``), else ``O``. Keeps entities contiguous across odd
    whitespace and pieces shared between tokens, never starts an entity on such a token."""
    following: List[str] = []  # following[i]: the next owned tag after token i (one backward pass)
    nxt = "O"
    for tag in reversed(tags):
        following.append(nxt)
        if tag is not None:
            nxt = tag
    following.reverse()
    out: List[str] = []
    for i, tag in enumerate(tags):
        if tag is not None:
            out.append(tag)
            continue
        prev = out[-1] if out else "O"
        nxt = following[i]
        if prev != "O" and nxt.startswith("I-") and nxt[2:] == prev[2:]:
            out.append("I-" + prev[2:])
        else:
            out.append("O")
    return out


def decode_bio(token_tags: Sequence[Optional[str]]) -> List[Tuple[int, int, str]]:
    """Entity spans from per-token tags (``None`` = token without its own piece), with BIO repair.

    After the repair, :func:`fill_unowned` only continues an entity the next token continues, so the sequence
    stays valid."""
    return bio_spans(fill_unowned(repair_bio_keep_none(token_tags)))


def repair_bio_keep_none(tags: Sequence[Optional[str]]) -> List[Optional[str]]:
    """:func:`hipe.repair_bio` over the tokens that have a tag, skipping ``None`` (unowned) tokens."""
    owned = [t for t in tags if t is not None]
    fixed = iter(repair_bio(owned, outside="O"))
    return [None if t is None else next(fixed) for t in tags]


def label_list(entity_types: Sequence[str]) -> List[str]:
    """The fixed label order: ``O``, then ``B-X``, ``I-X`` for each type in sorted order."""
    labels = ["O"]
    for t in sorted(set(entity_types)):
        labels += [f"B-{t}", f"I-{t}"]
    return labels


def token_char_spans(doc: Any) -> List[Tuple[int, int]]:
    """(start_char, end_char) of each token of a spaCy Doc."""
    return [(t.idx, t.idx + len(t.text)) for t in doc]


def piece_labels(encoded: EncodedText, token_tags: Sequence[str], label2id: Dict[str, int]) -> List[int]:
    """Training targets: each token's tag on its first piece, ``IGNORE_INDEX`` everywhere else."""
    targets = [IGNORE_INDEX] * len(encoded.input_ids)
    for t, p in enumerate(encoded.first_piece):
        if p >= 0:
            tag = token_tags[t]
            if tag not in label2id:
                raise KeyError(f"Tag {tag!r} of token {t} is not in the label map {sorted(label2id)}")
            targets[p] = label2id[tag]
    return targets
