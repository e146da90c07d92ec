"""Read and write HIPE TSV files (HIPE-2022 v2.1 packaging: HIPE-2020, AjMC, ...) and convert them to spaCy.

The reader keeps *everything* needed to write a file back byte for byte: the header, document comments
(``# hipe2022:document_id = ...``), segment comments and blank lines inside documents, every column of every
token and the raw MISC value (``NoSpaceAfter``, ``EndOfLine``, ``EndOfSentence``, ``Partial-...``, AjMC's
``LED0.00`` values and anything else).

A line is a comment when it starts with ``"# "`` (hash + space), or starts with ``#`` and has no tab; a line
such as ``"#\\tO\\tO..."`` is a token whose text is ``#``.

Main entry points: :func:`read_hipe_tsv`, :func:`write_hipe_tsv`, :func:`hipe_to_docs`, :func:`docs_to_hipe`,
:func:`iter_sentences`, :func:`convert_hipe_to_docbin`, :func:`convert_docbin_to_hipe`, :func:`copy_shared_data`.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:  # pragma: no cover
    from spacy.tokens import Doc
    from spacy.vocab import Vocab

PathLike = Union[str, Path]

HIPE_COLUMNS: Tuple[str, ...] = (
    "TOKEN",
    "NE-COARSE-LIT",
    "NE-COARSE-METO",
    "NE-FINE-LIT",
    "NE-FINE-METO",
    "NE-FINE-COMP",
    "NE-NESTED",
    "NEL-LIT",
    "NEL-METO",
    "MISC",
)
#: columns holding IOB entity tags (re-aligned by the noise module, filled from predictions here)
BIO_COLUMNS: Tuple[str, ...] = (
    "NE-COARSE-LIT",
    "NE-COARSE-METO",
    "NE-FINE-LIT",
    "NE-FINE-METO",
    "NE-FINE-COMP",
    "NE-NESTED",
)
NO_SPACE_AFTER = "NoSpaceAfter"
END_OF_LINE = "EndOfLine"
END_OF_SENTENCE = "EndOfSentence"
_DOC_ID_RE = re.compile(r"^#\s*(?:[\w.-]+:)?document_id\s*=")
_LED_RE = re.compile(r"^LED(\d+(?:\.\d+)?)$")


class HipeFormatError(ValueError):
    """A HIPE TSV file is malformed; the message names the file and line."""


# --------------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------------


@dataclass
class HipeToken:
    """One token line: ``text`` (the TOKEN column) and ``values`` (every other column, by name, verbatim)."""

    text: str
    values: Dict[str, str] = field(default_factory=dict)

    def get(self, column: str, default: str = "_") -> str:
        """Value of ``column`` (``"TOKEN"`` gives the text)."""
        if column == "TOKEN":
            return self.text
        return self.values.get(column, default)

    @property
    def misc(self) -> str:
        """Raw MISC value (``"_"`` when empty)."""
        return self.values.get("MISC", "_")

    @property
    def flags(self) -> List[str]:
        """MISC split on ``|`` (empty list for ``_``)."""
        misc = self.misc
        return [] if misc in ("_", "") else misc.split("|")

    def has_flag(self, flag: str) -> bool:
        return flag in self.flags

    def set_flag(self, flag: str, on: bool = True) -> None:
        """Add or remove a MISC flag, keeping the other flags in their order."""
        flags = [f for f in self.flags if f != flag]
        if on:
            flags.append(flag)
        self.values["MISC"] = "|".join(flags) if flags else "_"

    @property
    def no_space_after(self) -> bool:
        return NO_SPACE_AFTER in self.flags

    @property
    def end_of_line(self) -> bool:
        return END_OF_LINE in self.flags

    @property
    def end_of_sentence(self) -> bool:
        return END_OF_SENTENCE in self.flags

    @property
    def led(self) -> Optional[float]:
        """AjMC's per-entity normalised Levenshtein distance (``LED0.25`` -> 0.25), or None."""
        for flag in self.flags:
            m = _LED_RE.match(flag)
            if m:
                return float(m.group(1))
        return None

    def copy(self) -> "HipeToken":
        return HipeToken(self.text, dict(self.values))


@dataclass
class HipeDocument:
    """One HIPE document.

    ``comments``: the lines before the first token (``"# key = value"``, verbatim). ``inner_lines[i]``: lines
    (segment comments, blank lines) placed just before token ``i`` (i >= 1). ``trailing_lines``: lines after the
    last token (usually one blank line); ``None`` means "default": one blank line unless it is the last document.
    ``meta`` is free-form and never written (the noise module stores its token alignment there).
    """

    tokens: List[HipeToken] = field(default_factory=list)
    comments: List[str] = field(default_factory=list)
    columns: Tuple[str, ...] = HIPE_COLUMNS
    inner_lines: Dict[int, List[str]] = field(default_factory=dict)
    trailing_lines: Optional[List[str]] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> Dict[str, str]:
        """Document comments parsed as ``key = value`` (e.g. ``{"hipe2022:document_id": "EXP-..."}``)."""
        out: Dict[str, str] = {}
        for line in self.comments:
            if line.startswith("#") and "=" in line:
                key, _, value = line[1:].partition("=")
                out[key.strip()] = value.strip()
        return out

    @property
    def id(self) -> Optional[str]:
        """The ``document_id`` comment value, or None."""
        for key, value in self.metadata.items():
            if key == "document_id" or key.endswith(":document_id"):
                return value
        return None

    def sentence_spans(self) -> List[Tuple[int, int]]:
        """(start, end) token ranges of sentences, split after each ``EndOfSentence`` token."""
        spans, start = [], 0
        for i, tok in enumerate(self.tokens):
            if tok.end_of_sentence:
                spans.append((start, i + 1))
                start = i + 1
        if start < len(self.tokens):
            spans.append((start, len(self.tokens)))
        return spans

    def segment_spans(self) -> List[Tuple[int, int]]:
        """(start, end) token ranges of segments, split where ``inner_lines`` hold a comment line."""
        cuts = sorted(i for i, lines in self.inner_lines.items() if any(_is_comment(l) for l in lines) and 0 < i < len(self.tokens))
        bounds = [0] + cuts + [len(self.tokens)]
        return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]

    @property
    def sentences(self) -> List[List[HipeToken]]:
        """Tokens grouped by sentence (``EndOfSentence``)."""
        return [self.tokens[a:b] for a, b in self.sentence_spans()]

    def text(self) -> str:
        """Running text rebuilt from tokens and ``NoSpaceAfter`` (``EndOfLine`` gives a newline)."""
        return "".join(t.text + _sep_after(t, newline=True) for t in self.tokens)

    def char_offsets(self) -> List[Tuple[int, int]]:
        """(start, end) character offsets of each token in :meth:`text`."""
        out, pos = [], 0
        for t in self.tokens:
            out.append((pos, pos + len(t.text)))
            pos += len(t.text) + len(_sep_after(t, newline=True))
        return out


def _sep_after(tok: HipeToken, newline: bool = False) -> str:
    if tok.no_space_after:
        return ""
    return "\n" if (newline and tok.end_of_line) else " "


def _is_comment(line: str) -> bool:
    return line.startswith("# ") or (line.startswith("#") and "\t" not in line)


# --------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------


def read_hipe_tsv(path: PathLike) -> List[HipeDocument]:
    """Read a HIPE TSV file into documents, keeping everything needed for a byte-identical write-back."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise HipeFormatError(f"{path}: not valid UTF-8 ({err})") from None
    return parse_hipe_tsv(text, source=str(path))


def parse_hipe_tsv(text: str, source: str = "<string>") -> List[HipeDocument]:
    """Parse HIPE TSV text (see :func:`read_hipe_tsv`); ``source`` is used in error messages."""
    bom = text.startswith("\ufeff")
    if bom:
        text = text[1:]
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.split(newline)
    final_newline = lines[-1] == ""
    if final_newline:
        lines.pop()
    if not lines or not lines[0].startswith("TOKEN"):
        first = lines[0][:60] if lines else ""
        raise HipeFormatError(f"{source}:1: expected a header line starting with 'TOKEN', got {first!r}")
    columns = tuple(lines[0].split("\t"))
    ncols = len(columns)
    has_doc_ids = any(_DOC_ID_RE.match(l) for l in lines[1:])

    docs: List[HipeDocument] = []
    cur: Optional[HipeDocument] = None
    pending: List[str] = []

    def new_doc(comment_lines: List[str]) -> HipeDocument:
        doc = HipeDocument(tokens=[], comments=list(comment_lines), columns=columns)
        docs.append(doc)
        return doc

    def flush(at_end: bool) -> None:
        nonlocal cur, pending
        run, pending = pending, []
        # where do new documents start inside this run of non-token lines?
        starts: List[int] = []
        if has_doc_ids:
            i = 0
            while i < len(run):
                if _is_comment(run[i]):
                    j = i
                    while j < len(run) and _is_comment(run[j]):
                        j += 1
                    if any(_DOC_ID_RE.match(l) for l in run[i:j]):
                        starts.append(i)
                    i = j
                else:
                    i += 1
        else:
            seen_blank = False
            for i, l in enumerate(run):
                if not l.strip():
                    seen_blank = True
                elif seen_blank:
                    starts.append(i)
                    seen_blank = False
            if seen_blank and not at_end:
                starts.append(len(run))  # blank line(s) then tokens: a new document without comments
        if cur is None:  # start of file: everything before the first token belongs to the first document
            if at_end and not run:
                return
            starts = [0] + starts[1:]
        if not starts:
            if at_end:
                cur.trailing_lines = run
            else:
                cur.inner_lines[len(cur.tokens)] = run
            return
        if cur is not None:
            cur.trailing_lines = run[: starts[0]]
        bounds = starts + [len(run)]
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            chunk = run[a:b]
            last = k == len(starts) - 1
            if last and not at_end:
                cur = new_doc(chunk)
            else:  # a document without tokens: comments, then its trailing blank lines
                n = len(chunk)
                while n > 0 and not _is_comment(chunk[n - 1]):
                    n -= 1
                cur = new_doc(chunk[:n])
                cur.trailing_lines = chunk[n:]

    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip() or _is_comment(line):
            pending.append(line)
            continue
        parts = line.split("\t")
        if len(parts) != ncols:
            raise HipeFormatError(
                f"{source}:{lineno}: expected {ncols} tab-separated columns (header {'/'.join(columns)}), "
                f"got {len(parts)}: {line[:80]!r}"
            )
        if parts[0] == "":
            raise HipeFormatError(f"{source}:{lineno}: empty TOKEN value: {line[:80]!r}")
        if pending or cur is None:
            flush(at_end=False)
        cur.tokens.append(HipeToken(parts[0], dict(zip(columns[1:], parts[1:]))))
    if pending or cur is None:
        flush(at_end=True)
    if docs:
        docs[0].meta["bom"] = bom
        docs[-1].meta["final_newline"] = final_newline
        for d in docs:
            d.meta["newline"] = newline
    return docs


def format_hipe_tsv(docs: Sequence[HipeDocument], columns: Optional[Sequence[str]] = None) -> str:
    """Serialise documents to HIPE TSV text (the inverse of :func:`parse_hipe_tsv`)."""
    if columns is None:
        columns = docs[0].columns if docs else HIPE_COLUMNS
    columns = tuple(columns)
    for d in docs:
        if tuple(d.columns) != columns:
            raise ValueError(f"document {d.id!r} has columns {d.columns}, expected {columns}")
    newline = docs[0].meta.get("newline", "\n") if docs else "\n"
    out: List[str] = ["\t".join(columns)]
    value_cols = columns[1:]
    for k, d in enumerate(docs):
        out.extend(d.comments)
        for i, tok in enumerate(d.tokens):
            if i in d.inner_lines and i > 0:
                out.extend(d.inner_lines[i])
            out.append("\t".join([tok.text] + [tok.values.get(c, "_") for c in value_cols]))
        if d.trailing_lines is not None:
            out.extend(d.trailing_lines)
        elif k < len(docs) - 1:
            out.append("")
    text = newline.join(out)
    if not docs or docs[-1].meta.get("final_newline", True):
        text += newline
    if docs and docs[0].meta.get("bom"):
        text = "\ufeff" + text
    return text


def write_hipe_tsv(docs: Sequence[HipeDocument], path: PathLike) -> None:
    """Write documents to a HIPE TSV file (UTF-8); a read/write round trip is byte-identical."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(format_hipe_tsv(docs).encode("utf-8"))


def _as_docs(hipe: Union[PathLike, HipeDocument, Iterable[HipeDocument]]) -> List[HipeDocument]:
    if isinstance(hipe, (str, Path)):
        return read_hipe_tsv(hipe)
    if isinstance(hipe, HipeDocument):
        return [hipe]
    return list(hipe)


# --------------------------------------------------------------------------------------------
# BIO helpers
# --------------------------------------------------------------------------------------------


def bio_spans(tags: Sequence[str]) -> List[Tuple[int, int, str]]:
    """Entity spans ``(start, end, label)`` from IOB tags.

    ``O``, ``_`` and anything not starting with ``B-``/``I-`` are outside. An ``I-x`` that does not continue an
    entity of type ``x`` starts a new entity (it is read as ``B-x``).
    """
    spans: List[Tuple[int, int, str]] = []
    start, label = None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if tag.startswith("B-") or tag.startswith("I-"):
            lab = tag[2:]
            if tag.startswith("I-") and label == lab:
                continue
            if label is not None:
                spans.append((start, i, label))
            start, label = i, lab
        else:
            if label is not None:
                spans.append((start, i, label))
            start, label = None, None
    return spans


def repair_bio(tags: Sequence[str], outside: Optional[str] = None) -> List[str]:
    """Valid IOB: an orphan ``I-x`` becomes ``B-x``. Outside tags are kept (or replaced by ``outside``)."""
    out = [t if (outside is None or t.startswith(("B-", "I-"))) else outside for t in tags]
    res = list(out)
    for i, tag in enumerate(out):
        if tag.startswith("I-"):
            prev = res[i - 1] if i > 0 else "O"
            if not (prev.startswith(("B-", "I-")) and prev[2:] == tag[2:]):
                res[i] = "B-" + tag[2:]
    return res


def spans_to_bio(n: int, spans: Iterable[Tuple[int, int, str]], outside: str = "O") -> List[str]:
    """IOB tags of length ``n`` from ``(start, end, label)`` spans."""
    tags = [outside] * n
    for start, end, label in spans:
        for i in range(start, end):
            tags[i] = ("B-" if i == start else "I-") + label
    return tags


def iter_sentences(
    hipe_docs: Union[PathLike, Iterable[HipeDocument]],
    column: str = "NE-COARSE-LIT",
    repair: bool = True,
) -> Iterator[Tuple[List[str], List[str], List[bool]]]:
    """Yield ``(words, tags, spaces)`` per sentence (split on ``EndOfSentence``).

    ``tags`` come from ``column``; with ``repair`` they are valid IOB (``_`` -> ``O``, orphan ``I-`` -> ``B-``).
    ``spaces[i]`` is False when the token has ``NoSpaceAfter``.
    """
    for doc in _as_docs(hipe_docs):
        for a, b in doc.sentence_spans():
            toks = doc.tokens[a:b]
            tags = [t.get(column, "O") for t in toks]
            if repair:
                tags = repair_bio(tags, outside="O")
            yield [t.text for t in toks], tags, [not t.no_space_after for t in toks]


# --------------------------------------------------------------------------------------------
# spaCy conversion
# --------------------------------------------------------------------------------------------

#: Doc extension holding document-level HIPE info (comments, layout, columns, split part).
DOC_EXT = "hipe"
#: Token extension holding all original columns except TOKEN (a dict, MISC included).
TOKEN_EXT = "hipe"


def register_extensions() -> None:
    """Register ``Doc._.hipe`` and ``Token._.hipe`` (idempotent)."""
    from spacy.tokens import Doc, Token

    if not Doc.has_extension(DOC_EXT):
        Doc.set_extension(DOC_EXT, default=None, force=True)
    if not Token.has_extension(TOKEN_EXT):
        Token.set_extension(TOKEN_EXT, default=None, force=True)


def blank_vocab(lang: Optional[str] = None) -> "Vocab":
    """A blank Vocab: language-neutral for ``None`` (fast), else like ``spacy.blank(lang).vocab``."""
    from spacy.vocab import Vocab, create_vocab

    if lang is None:
        return Vocab()
    from spacy.util import get_lang_class

    return create_vocab(lang, get_lang_class(lang).Defaults)


def hipe_to_docs(
    hipe_docs: Union[PathLike, Iterable[HipeDocument]],
    nlp_or_vocab: Any = None,
    column: str = "NE-COARSE-LIT",
    split: str = "document",
) -> List["Doc"]:
    """Convert HIPE documents to spaCy Docs (words = TSV tokens, ents from ``column``, sentence starts set).

    ``split``: ``"document"`` (one Doc per HIPE document), ``"sentence"`` (split on ``EndOfSentence``) or
    ``"segment"`` (split on segment comments). Spaces follow ``NoSpaceAfter``; ``EndOfLine`` gives a space.
    Every original value is kept in ``Token._.hipe`` / ``Doc._.hipe`` so that :func:`docs_to_hipe` can write the
    file back exactly. ``nlp_or_vocab``: a Language, a Vocab, or None (a blank language-neutral Vocab).
    """
    from spacy.tokens import Doc, Span

    register_extensions()
    if split not in ("document", "sentence", "segment"):
        raise ValueError(f"split must be 'document', 'sentence' or 'segment', got {split!r}")
    if nlp_or_vocab is None:
        vocab = blank_vocab(None)
    else:
        vocab = getattr(nlp_or_vocab, "vocab", nlp_or_vocab)

    out: List[Doc] = []
    for k, hdoc in enumerate(_as_docs(hipe_docs)):
        if split == "document":
            parts = [(0, len(hdoc.tokens))]
        elif split == "sentence":
            parts = hdoc.sentence_spans() or [(0, 0)]
        else:
            parts = hdoc.segment_spans() or [(0, 0)]
        sent_starts = {a for a, _ in hdoc.sentence_spans()}
        for p, (a, b) in enumerate(parts):
            toks = hdoc.tokens[a:b]
            words = [t.text for t in toks]
            spaces = [not t.no_space_after for t in toks]
            starts = [(a + i) in sent_starts for i in range(len(toks))]
            doc = Doc(vocab, words=words, spaces=spaces, sent_starts=starts if toks else None)
            tags = [t.get(column, "O") for t in toks]
            doc.ents = [Span(doc, s, e, label=lab) for s, e, lab in bio_spans(tags)]
            for tok, htok in zip(doc, toks):
                tok._.set(TOKEN_EXT, dict(htok.values))
            info = {
                "doc_index": k,
                "doc_id": hdoc.id,
                "part": p,
                "n_parts": len(parts),
                "split": split,
                "column": column,
                "columns": list(hdoc.columns),
                "comments": list(hdoc.comments) if p == 0 else [],
                "inner_lines": {i - a: list(v) for i, v in hdoc.inner_lines.items() if a <= i < b and (i > a or p == 0 and i == 0)},
                "boundary_lines": list(hdoc.inner_lines.get(a, [])) if p > 0 else [],
                "trailing_lines": (list(hdoc.trailing_lines) if hdoc.trailing_lines is not None else None)
                if p == len(parts) - 1
                else None,
                "file": {key: hdoc.meta[key] for key in ("bom", "final_newline", "newline") if key in hdoc.meta},
            }
            doc._.set(DOC_EXT, info)
            out.append(doc)
    return out


def docs_to_hipe(
    docs: Iterable["Doc"],
    column: str = "NE-COARSE-LIT",
    other_columns: str = "original",
    columns: Sequence[str] = HIPE_COLUMNS,
    rejoin_entities: bool = True,
) -> List[HipeDocument]:
    """Convert spaCy Docs back to HIPE documents, taking ``column`` from ``doc.ents``.

    Docs made by :func:`hipe_to_docs` keep their comments, layout, MISC and (with ``other_columns="original"``)
    all other columns; with ``other_columns="_"`` the other NE/NEL columns are written as ``_`` (TOKEN and MISC
    are always kept). Parts of a document split by sentence/segment are joined again. Docs without HIPE info
    (e.g. raw text run through a pipeline) become new documents: whitespace tokens are dropped
    (``EndOfLine`` when they hold a newline), ``NoSpaceAfter`` and ``EndOfSentence`` come from the Doc.

    ``rejoin_entities``: an entity cut by a sentence/segment split (the part's first token was ``I-x`` in the
    source file) is joined again when the Doc has ``B-x`` there and the previous part ended inside an ``x``
    entity, so that a sentence-split round trip reproduces the file exactly.
    """
    register_extensions()
    if other_columns not in ("original", "_"):
        raise ValueError(f"other_columns must be 'original' or '_', got {other_columns!r}")
    result: List[HipeDocument] = []
    current_key = None
    for n, doc in enumerate(docs):
        info = doc._.get(DOC_EXT) if doc.has_extension(DOC_EXT) else None
        tags = doc_bio_tags(doc)
        if info is None:
            result.append(_plain_doc_to_hipe(doc, tags, column, tuple(columns), n))
            current_key = None
            continue
        key = (info["doc_index"], info.get("doc_id"))
        cols = tuple(info["columns"])
        if current_key != key or info["part"] == 0:
            hdoc = HipeDocument(tokens=[], comments=list(info["comments"]), columns=cols)
            hdoc.meta.update(info.get("file", {}))
            result.append(hdoc)
            current_key = key
        hdoc = result[-1]
        offset = len(hdoc.tokens)
        if offset and info.get("boundary_lines"):
            hdoc.inner_lines[offset] = list(info["boundary_lines"])
        for rel, lines in info["inner_lines"].items():
            if offset + int(rel) > 0:
                hdoc.inner_lines[offset + int(rel)] = list(lines)
        for tok, tag in zip(doc, tags):
            values = tok._.get(TOKEN_EXT)
            if values is None:
                raise ValueError(f"doc {info.get('doc_id')!r}: token {tok.i} ({tok.text!r}) has no Token._.hipe values; was the Doc re-tokenized?")
            values = dict(values)
            if other_columns == "_":
                values = {c: ("_" if c not in ("MISC",) else v) for c, v in values.items()}
            if column in cols:
                original = (tok._.get(TOKEN_EXT) or {}).get(column, "")
                if tag.startswith("B-") and original == "I-" + tag[2:]:
                    prev = hdoc.tokens[-1].get(column) if hdoc.tokens else "O"
                    prev_inside = prev.startswith(("B-", "I-")) and prev[2:] == tag[2:]
                    if not prev_inside:
                        tag = original  # the source had an orphan I-x here: same entity, written as in the source
                    elif rejoin_entities and tok.i == 0 and info["part"] > 0:
                        tag = original  # an entity that the sentence/segment split had cut in two
                values[column] = tag
            hdoc.tokens.append(HipeToken(tok.text, values))
        if info["part"] == info["n_parts"] - 1:
            hdoc.trailing_lines = None if info["trailing_lines"] is None else list(info["trailing_lines"])
    return result


def doc_bio_tags(doc: "Doc") -> List[str]:
    """One IOB tag per token of ``doc`` from ``doc.ents`` (``"O"`` outside entities)."""
    tags = ["O"] * len(doc)
    for ent in doc.ents:
        for i in range(ent.start, ent.end):
            tags[i] = ("B-" if i == ent.start else "I-") + ent.label_
    return tags


def _plain_doc_to_hipe(doc: "Doc", tags: List[str], column: str, columns: Tuple[str, ...], n: int) -> HipeDocument:
    doc_id = doc.user_data.get("doc_id") if isinstance(doc.user_data, dict) else None
    doc_id = doc_id or f"doc-{n:05d}"
    hdoc = HipeDocument(
        comments=[f"# hipe2022:document_id = {doc_id}", f"# hipe2022:applicable_columns = {' '.join(columns)}"],
        columns=columns,
    )
    sent_ends = set()
    if doc.has_annotation("SENT_START"):
        sent_ends = {s.end - 1 for s in doc.sents}
    for tok, tag in zip(doc, tags):
        if tok.text.isspace():
            if hdoc.tokens and "\n" in tok.text:
                hdoc.tokens[-1].set_flag(END_OF_LINE)
            continue
        values = {c: ("O" if c in BIO_COLUMNS else "_") for c in columns[1:]}
        if column in values:
            values[column] = tag
        htok = HipeToken(tok.text, values)
        if not tok.whitespace_:
            htok.set_flag(NO_SPACE_AFTER)
        if "\n" in tok.whitespace_:
            htok.set_flag(END_OF_LINE)
        if tok.i in sent_ends:
            htok.set_flag(END_OF_SENTENCE)
        hdoc.tokens.append(htok)
    return hdoc


def convert_hipe_to_docbin(
    in_tsv: PathLike,
    out_spacy: PathLike,
    column: str = "NE-COARSE-LIT",
    split: str = "document",
    lang: Optional[str] = None,
) -> int:
    """HIPE TSV -> spaCy DocBin (user data kept, so the reverse conversion is exact). Returns the number of Docs."""
    docs = hipe_to_docs(read_hipe_tsv(in_tsv), blank_vocab(lang), column=column, split=split)
    write_docbin(docs, out_spacy)
    return len(docs)


def read_docbin(path: PathLike, lang: Optional[str] = None) -> List["Doc"]:
    """Load all Docs of a ``.spacy`` DocBin file (HIPE extensions registered)."""
    from spacy.tokens import DocBin

    register_extensions()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DocBin file not found: {path}")
    return list(DocBin().from_disk(path).get_docs(blank_vocab(lang)))


def write_docbin(docs: Iterable["Doc"], path: PathLike) -> None:
    """Write Docs to a ``.spacy`` DocBin file with their user data (parent folders are created)."""
    from spacy.tokens import DocBin

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    DocBin(store_user_data=True, docs=docs).to_disk(path)


def convert_docbin_to_hipe(
    in_spacy: PathLike,
    out_tsv: PathLike,
    column: str = "NE-COARSE-LIT",
    other_columns: str = "original",
    lang: Optional[str] = None,
) -> int:
    """spaCy DocBin -> HIPE TSV (``column`` from ``doc.ents``). Returns the number of HIPE documents."""
    hdocs = docs_to_hipe(read_docbin(in_spacy, lang=lang), column=column, other_columns=other_columns)
    write_hipe_tsv(hdocs, out_tsv)
    return len(hdocs)


# --------------------------------------------------------------------------------------------
# real data from the shared folder
# --------------------------------------------------------------------------------------------

#: relative path -> git blob sha1 (from the shared data README)
SHARED_DATA_FILES: Dict[str, str] = {
    "hipe2020/fr/HIPE-2022-v2.1-hipe2020-train-fr.tsv": "15657f514e5047424fa0458c696c55ec4c7878fb",
    "hipe2020/fr/HIPE-2022-v2.1-hipe2020-dev-fr.tsv": "ecac404ae05990821e203b53c7ccc4634976c964",
    "hipe2020/fr/HIPE-2022-v2.1-hipe2020-test-fr.tsv": "353404f2507696873b3a8505dd894c9a3ace6ebc",
    "ajmc/fr/HIPE-2022-v2.1-ajmc-train-fr.tsv": "87f7d82f3af5eaddd9e480fe4db2f2e26e9b8922",
    "ajmc/fr/HIPE-2022-v2.1-ajmc-dev-fr.tsv": "30ca4887b9853b36e8734329c343eb94aed848e7",
    "ajmc/fr/HIPE-2022-v2.1-ajmc-test-fr.tsv": "03e0d3759fc05e4e9a77d80f8fd3ef63c501e4f9",
}
#: documentation/licence files copied alongside when present (no hash check)
SHARED_DOC_FILES: Tuple[str, ...] = (
    "hipe2020/LICENSE",
    "hipe2020/README.md",
    "hipe2020/README-hipe2020.md",
    "ajmc/LICENSE",
    "ajmc/README.md",
    "ajmc/README-ajmc.md",
)


def git_blob_sha1(data: bytes) -> str:
    """The id ``git hash-object`` gives to ``data``: sha1 of ``b"blob <len>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def copy_shared_data(dest: PathLike = "assets", shared: PathLike = "../shared/data", overwrite: bool = False) -> List[Path]:
    """Copy the real HIPE-2020 / AjMC French files into ``dest/hipe2020/fr`` and ``dest/ajmc/fr``.

    Every data file is checked against its git blob hash before copying. Files already present with the right
    hash are kept. Raises FileNotFoundError when ``shared`` or a file is missing and ValueError on a hash mismatch.
    Returns the paths of the data files in ``dest``.
    """
    shared, dest = Path(shared), Path(dest)
    if not shared.is_dir():
        raise FileNotFoundError(
            f"shared data folder not found: {shared.resolve()} (pass --shared PATH to the folder that holds "
            "hipe2020/ and ajmc/; the data are licensed CC BY-NC-SA 4.0 / CC BY 4.0 and are never committed)"
        )
    copied: List[Path] = []
    for rel, blob in SHARED_DATA_FILES.items():
        src, dst = shared / rel, dest / rel
        if not src.is_file():
            raise FileNotFoundError(f"missing shared data file: {src}")
        if dst.is_file() and not overwrite and git_blob_sha1(dst.read_bytes()) == blob:
            copied.append(dst)
            continue
        data = src.read_bytes()
        got = git_blob_sha1(data)
        if got != blob:
            raise ValueError(f"{src}: git blob hash {got} does not match the expected {blob}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        copied.append(dst)
    for rel in SHARED_DOC_FILES:
        src = shared / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
    return copied
