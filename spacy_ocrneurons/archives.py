"""Batch annotation of digitized archives (``ocrneurons annotate``).

The module is organised as a small pipeline whose stages exchange *plain* data
(dicts, strings, bytes) so that the same code runs in-process, in a
``multiprocessing`` pool (``n_process``) and on Ray Data (``archives_ray``):

1. **Discovery** (:class:`InputSet`): files, folders (recursive, sorted) and globs are
   expanded lazily, in a deterministic order.  Each file gets a *relative path*
   (relative to the common root of all inputs) that is stable across machines.
2. **Descriptors** (:func:`iter_descriptors`): one small dict per input document.  A
   text/ALTO/PAGE file is one document (key = relative path); a JSONL file yields
   one document per non-blank line (key = ``relpath:lineno``, the line's bytes are
   carried in the descriptor).  Keys are what the resume manifest records.
3. **Parsing** (:func:`parse_document`): bytes → ``{"text", "words", ...}`` where
   ``words`` are the *source words* (ALTO ``String`` / PAGE ``Word``) with their
   character span in the text, ids, boxes, polygons and OCR confidences.  Every
   problem (malformed XML, undecodable bytes, empty text, too large...) becomes an
   ``error`` entry instead of an exception.
4. **Annotation** (:func:`annotate_parsed`): ``nlp.make_doc(text)`` (so the
   pipeline's own tokenizer is used) + the source words in
   ``doc.user_data["ocrneurons_archive"]``, length-sorted ``nlp.pipe`` batches, and
   one result per document: the JSONL record (string), the HIPE TSV block and,
   if asked, a one-document ``DocBin``.
5. **Writing** (:class:`ArchiveWriter`): shards written to a temporary name, fsynced
   and atomically renamed; then the shard's keys are appended (and fsynced) to
   ``manifest.jsonl``.  ``--resume`` reads the manifest, deletes uncommitted
   shard files and temporary files and skips committed keys, so a ``kill -9`` at
   any point never loses nor duplicates a document.

Text construction from ALTO / PAGE
----------------------------------
* words of a line are joined by one space (ALTO: if the line has ``SP`` elements,
  a space is written only where an ``SP`` separates two ``String`` s), lines of a
  block/region are joined by one space, blocks/regions by ``"\\n"``;
* ALTO hyphenation (``SUBS_TYPE="HypPart1"/"HypPart2"`` with ``SUBS_CONTENT``, or a
  ``HYP`` element at the end of a line) is **dehyphenated**: the text contains the
  ``SUBS_CONTENT`` form (else the concatenation of the two parts) once, as one
  whitespace-delimited word; both source words map to that span, each with its
  own id, box and confidence.  PAGE XML has no hyphenation markup; its text is
  kept as written;
* reading order: ALTO ``ReadingOrder`` (v3+) ``ElementRef/@REF`` order for the
  blocks it references, then the other blocks in document order; PAGE
  ``ReadingOrder`` (``OrderedGroup``/``RegionRefIndexed@index``, nested groups
  flattened), then unreferenced regions in document order.

Entities map back to the source words whose character span overlaps theirs.
"""
from __future__ import annotations

import bisect
import glob
import json
import math
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .hipe import HIPE_COLUMNS

INPUT_FORMATS = ("text", "jsonl", "alto", "page")
OUTPUT_FORMATS = ("jsonl", "docbin", "hipe")
USER_DATA_KEY = "ocrneurons_archive"
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 32
MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG = "run.json"
SHARD_PATTERNS = {
    "jsonl": "records-{:05d}.jsonl",
    "docbin": "docs-{:05d}.spacy",
    "hipe": "hipe-{:05d}.tsv",
}
_SHARD_RE = re.compile(r"^(records|docs|hipe)-(\d{5,})\.(jsonl|spacy|tsv)$")
_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".xml": None,  # ALTO or PAGE: sniffed
    ".alto": "alto",
}
_GLOB_CHARS = re.compile(r"[*?\[]")


class ArchiveError(Exception):
    """A user-facing error (bad input path, bad option, inconsistent output folder)."""


# --------------------------------------------------------------------------------------------
# 1. Discovery
# --------------------------------------------------------------------------------------------


def _is_glob(s: str) -> bool:
    return bool(_GLOB_CHARS.search(s))


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed: List[str] = []
    for p in parts:
        if _is_glob(p):
            break
        fixed.append(p)
    root = os.path.join(*fixed) if fixed else "."
    return os.path.abspath(root)


def _walk_sorted(folder: str) -> Iterator[str]:
    """Recursive, sorted, streaming walk; hidden entries are skipped."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            yield from _walk_sorted(entry.path)
        elif entry.is_file(follow_symlinks=True):
            if os.path.splitext(entry.name)[1].lower() in _EXTENSIONS:
                yield entry.path


class InputSet:
    """The input documents' files: files, folders and glob patterns, in a deterministic order.

    Paths are validated eagerly (a missing path or a glob without matches raises
    :class:`ArchiveError` naming it) but folders are walked lazily, so millions of
    files are never listed in memory at once.  Folders are walked recursively in
    sorted order and only files with a known extension (``.txt .text .jsonl .ndjson
    .xml .alto``) are taken from them; files named explicitly (or matched by a
    glob) are always taken.
    """

    def __init__(self, inputs: Sequence[str]):
        if not inputs:
            raise ArchiveError("no input given: pass files, folders or glob patterns")
        self.items: List[Tuple[str, str]] = []  # (kind, path)
        roots = []
        for raw in inputs:
            raw = str(raw)
            if os.path.isdir(raw):
                self.items.append(("dir", os.path.abspath(raw)))
                roots.append(os.path.abspath(raw))
            elif os.path.isfile(raw):
                self.items.append(("file", os.path.abspath(raw)))
                roots.append(os.path.dirname(os.path.abspath(raw)))
            elif _is_glob(raw):
                if not any(True for _ in glob.iglob(raw, recursive=True)):
                    raise ArchiveError(f"no file matches the input pattern {raw!r}")
                self.items.append(("glob", raw))
                roots.append(_glob_root(raw))
            else:
                raise ArchiveError(f"input not found: {raw!r} (not a file, a folder or a glob pattern)")
        self.root = os.path.commonpath(roots) if len(roots) > 1 else roots[0]
        self._dedupe = len(self.items) > 1

    def relpath(self, path: str) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def __iter__(self) -> Iterator[Tuple[str, str]]:
        """Yield ``(absolute path, relative path)``."""
        seen = set() if self._dedupe else None
        for kind, path in self.items:
            if kind == "file":
                paths: Iterable[str] = [path]
            elif kind == "dir":
                paths = _walk_sorted(path)
            else:
                paths = (os.path.abspath(p) for p in sorted(glob.glob(path, recursive=True)) if os.path.isfile(p))
            for p in paths:
                if seen is not None:
                    if p in seen:
                        continue
                    seen.add(p)
                yield p, self.relpath(p)


def sniff_format(path: str, head: bytes) -> str:
    """Guess the format of a file from its extension and first bytes."""
    ext = os.path.splitext(path)[1].lower()
    fmt = _EXTENSIONS.get(ext)
    if fmt:
        return fmt
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if ext == ".xml" or h.startswith(b"<"):
        m = re.search(rb"<(?:[A-Za-z_][\w.-]*:)?(alto|PcGts)\b", head)
        if m:
            return "alto" if m.group(1) == b"alto" else "page"
        return "xml"  # unknown XML dialect: becomes an error record
    if h.startswith(b"{"):
        return "jsonl"
    return "text"


# --------------------------------------------------------------------------------------------
# 2. Descriptors
# --------------------------------------------------------------------------------------------


def _descriptor(key, path, rel, fmt, line=-1, data=b"", error=""):
    return {"key": key, "path": path, "rel": rel, "fmt": fmt, "line": line, "data": data, "error": error}


def iter_descriptors(
    inputs: InputSet, input_format: Optional[str] = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[Dict[str, Any]]:
    """One descriptor per input document, in input order (streaming, bounded memory)."""
    if input_format not in (None, "auto") and input_format not in INPUT_FORMATS:
        raise ArchiveError(f"unknown input format {input_format!r}; expected one of {', '.join(INPUT_FORMATS)}")
    for path, rel in inputs:
        fmt = input_format if input_format not in (None, "auto") else None
        if fmt is None:
            try:
                with open(path, "rb") as f:
                    head = f.read(4096)
            except OSError as e:
                yield _descriptor(rel, path, rel, "unknown", error=f"unreadable: {e}")
                continue
            fmt = sniff_format(path, head)
        if fmt != "jsonl":
            yield _descriptor(rel, path, rel, fmt)
            continue
        try:
            f = open(path, "rb")
        except OSError as e:
            yield _descriptor(rel, path, rel, "jsonl", error=f"unreadable: {e}")
            continue
        with f:
            lineno = 0
            while True:
                line = f.readline(max_bytes + 1)
                if not line:
                    break
                lineno += 1
                if len(line) > max_bytes and not line.endswith(b"\n"):
                    while True:  # skip the rest of an oversized line
                        rest = f.readline(1 << 20)
                        if not rest or rest.endswith(b"\n"):
                            break
                    yield _descriptor(
                        f"{rel}:{lineno}", path, rel, "jsonl", lineno,
                        error=f"too_large: line exceeds --max-bytes ({max_bytes} bytes)",
                    )
                    continue
                if not line.strip():
                    continue  # blank lines are not documents
                yield _descriptor(f"{rel}:{lineno}", path, rel, "jsonl", lineno, data=line)


def count_documents(inputs: InputSet, input_format: Optional[str] = None, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Number of documents (a cheap pass: JSONL files are scanned for non-blank lines)."""
    n = 0
    for path, _rel in inputs:
        fmt = input_format if input_format not in (None, "auto") else None
        if fmt is None:
            try:
                with open(path, "rb") as f:
                    fmt = sniff_format(path, f.read(4096))
            except OSError:
                fmt = "text"
        if fmt != "jsonl":
            n += 1
            continue
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        n += 1
        except OSError:
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# 3. Parsing
# --------------------------------------------------------------------------------------------


class DocumentError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def _num(v: Optional[str]):
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        f = float(v)
    except ValueError:
        return None
    if not math.isfinite(f):
        return None
    return int(f) if f.is_integer() else f


def _conf(v: Optional[str]):
    n = _num(v)
    return None if n is None else float(n)


def _local(el) -> str:
    tag = el.tag
    if not isinstance(tag, str):
        return ""
    return tag.rsplit("}", 1)[-1]


def _safe_parser():
    from lxml import etree

    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        load_dtd=False,
        dtd_validation=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_xml(data: bytes):
    """Parse XML bytes safely (no network, no DTD, no entity expansion, no huge trees)."""
    from lxml import etree

    try:
        root = etree.fromstring(data, _safe_parser())
    except etree.XMLSyntaxError as e:
        raise DocumentError("malformed_xml", f"malformed XML: {e}") from None
    if root is None:
        raise DocumentError("malformed_xml", "malformed XML: no root element")
    return root


class _TextBuilder:
    """Accumulates the document text and the source words with their character spans."""

    def __init__(self):
        self.parts: List[str] = []
        self.pos = 0
        self.words: List[Dict[str, Any]] = []
        self._pending_sep = ""

    def sep(self, s: str):
        # the strongest separator wins ("\n" over " " over "")
        if self.pos == 0:
            return
        if len(s) > len(self._pending_sep) or ("\n" in s and "\n" not in self._pending_sep):
            self._pending_sep = s

    def add(self, text: str, sources: List[Dict[str, Any]]):
        if not text:
            return
        if self._pending_sep:
            self.parts.append(self._pending_sep)
            self.pos += len(self._pending_sep)
        self._pending_sep = ""
        start = self.pos
        self.parts.append(text)
        self.pos += len(text)
        for s in sources:
            s["start"] = start
            s["end"] = self.pos
            self.words.append(s)

    def text(self) -> str:
        return "".join(self.parts)


def _box_from_points(points: List[List[float]]):
    if not points:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, y0 = min(xs), min(ys)
    return [x0, y0, max(xs) - x0, max(ys) - y0]


# --- ALTO ------------------------------------------------------------------------------------


def _alto_reading_order(root) -> Dict[str, int]:
    rank: Dict[str, int] = {}
    for ro in root.iterchildren("{*}ReadingOrder"):
        for ref in ro.iter("{*}ElementRef"):
            r = ref.get("REF")
            if r and r not in rank:
                rank[r] = len(rank)
    return rank


def _ranked(elements, rank: Dict[str, int], stop, id_attr: str):
    """Sort elements: those (or whose ancestor) referenced by the reading order first, in
    that order, then the others in document order."""
    out = []
    for di, el in enumerate(elements):
        r = None
        if rank:
            node = el
            while node is not None and node is not stop:
                nid = node.get(id_attr)
                if nid and nid in rank:
                    r = rank[nid]
                    break
                node = node.getparent()
        out.append(((0, r, di) if r is not None else (1, 0, di), el))
    out.sort(key=lambda t: t[0])
    return [el for _k, el in out]


def _parse_alto(root, builder: _TextBuilder) -> Dict[str, Any]:
    if _local(root) != "alto":
        raise DocumentError("unsupported_xml", f"not an ALTO document (root element <{_local(root)}>)")
    info: Dict[str, Any] = {}
    for desc in root.iterchildren("{*}Description"):
        for mu in desc.iterchildren("{*}MeasurementUnit"):
            if mu.text:
                info["units"] = mu.text.strip()
    rank = _alto_reading_order(root)
    ordinal = 0
    # flat stream of strings in reading order with their separators
    items: List[Dict[str, Any]] = []
    for pi, page in enumerate(root.iter("{*}Page")):
        page_id = page.get("ID") or page.get("PHYSICAL_IMG_NR") or f"page{pi + 1}"
        for block in _ranked(page.iter("{*}TextBlock"), rank, page, "ID"):
            block_id = block.get("ID")
            first_in_block = True
            for line in block.iterchildren("{*}TextLine"):
                line_id = line.get("ID")
                children = []
                has_sp = False
                for c in line.iterchildren("{*}String", "{*}SP", "{*}HYP"):
                    tag = c.tag
                    name = tag[tag.rfind("}") + 1:]
                    if name == "SP":
                        has_sp = True
                    children.append((name, c))
                line_items: List[Dict[str, Any]] = []
                for ci, (name, c) in enumerate(children):
                    if name == "String":
                        ordinal += 1
                        get = c.get
                        content = get("CONTENT") or ""
                        if not content.strip():
                            continue
                        hpos, vpos, w, h = _num(get("HPOS")), _num(get("VPOS")), _num(get("WIDTH")), _num(get("HEIGHT"))
                        box = [hpos, vpos, w, h] if None not in (hpos, vpos, w, h) else None
                        line_items.append({
                            "src": {
                                "id": get("ID") or f"w{ordinal}",
                                "text": content,
                                "box": box,
                                "conf": _conf(get("WC")),
                                "page": page_id,
                                "block": block_id,
                                "line": line_id,
                            },
                            "content": content,
                            "subs_type": get("SUBS_TYPE"),
                            "subs": get("SUBS_CONTENT"),
                            "space_after": (not has_sp) or (ci + 1 < len(children) and children[ci + 1][0] == "SP"),
                            "hyp": None,
                            "sep": " ",
                        })
                    elif name == "HYP" and line_items:
                        line_items[-1]["hyp"] = c.get("CONTENT") or "-"
                if not line_items:
                    continue
                for it in line_items[:-1]:
                    it["sep"] = " " if it["space_after"] else ""
                line_items[-1]["sep"] = " "  # end of line
                line_items[-1]["eol"] = True
                if first_in_block and items:
                    items[-1]["sep"] = "\n"
                first_in_block = False
                items.extend(line_items)
    # dehyphenation
    i = 0
    n = len(items)
    while i < n:
        it = items[i]
        nxt = items[i + 1] if i + 1 < n else None
        joinable = nxt is not None and it.get("eol") and nxt.get("subs_type") != "HypPart1"
        if it["subs_type"] == "HypPart1" and nxt is not None and nxt["subs_type"] == "HypPart2":
            word = it["subs"] or nxt["subs"] or (it["content"] + nxt["content"])
            builder.add(word, [dict(it["src"], hyphen="part1"), dict(nxt["src"], hyphen="part2")])
            builder.sep(nxt["sep"])
            i += 2
            continue
        if it["hyp"] is not None and joinable and it["subs_type"] != "HypPart1":
            word = nxt["subs"] if nxt["subs_type"] == "HypPart2" and nxt["subs"] else it["content"] + nxt["content"]
            builder.add(word, [dict(it["src"], hyphen="part1"), dict(nxt["src"], hyphen="part2")])
            builder.sep(nxt["sep"])
            i += 2
            continue
        word = it["content"]
        if it["hyp"] is not None:
            word += it["hyp"]
        builder.add(word, [it["src"]])
        builder.sep(it["sep"])
        i += 1
    return info


# --- PAGE ------------------------------------------------------------------------------------


def _page_points(el) -> Optional[List[List[float]]]:
    for c in el:
        if _local(c) != "Coords":
            continue
        pts = c.get("points")
        out: List[List[float]] = []
        if pts:
            for pair in pts.split():
                xy = pair.split(",")
                if len(xy) == 2:
                    x, y = _num(xy[0]), _num(xy[1])
                    if x is not None and y is not None:
                        out.append([x, y])
        else:  # PAGE 2010/2013: <Point x= y=/>
            for p in c:
                if _local(p) == "Point":
                    x, y = _num(p.get("x")), _num(p.get("y"))
                    if x is not None and y is not None:
                        out.append([x, y])
        return out or None
    return None


def _page_text_equiv(el) -> Tuple[Optional[str], Optional[float]]:
    best = None
    for c in el:
        if _local(c) != "TextEquiv":
            continue
        idx = _num(c.get("index"))
        idx = 0 if idx is None else idx
        if best is None or idx < best[0]:
            best = (idx, c)
    if best is None:
        return None, None
    te = best[1]
    text = None
    for u in te:
        if _local(u) == "Unicode":
            text = u.text or ""
            break
    return text, _conf(te.get("conf"))


def _page_reading_order(page) -> Dict[str, int]:
    rank: Dict[str, int] = {}

    def walk(group):
        kids = [c for c in group if _local(c) in (
            "RegionRefIndexed", "OrderedGroupIndexed", "UnorderedGroupIndexed", "RegionRef", "OrderedGroup",
            "UnorderedGroup")]
        if _local(group).startswith("OrderedGroup"):
            kids.sort(key=lambda c: (_num(c.get("index")) if _num(c.get("index")) is not None else 1 << 30))
        for c in kids:
            ref = c.get("regionRef")
            if ref and ref not in rank:
                rank[ref] = len(rank)
            if "Group" in _local(c):
                walk(c)

    for el in page:
        if _local(el) == "ReadingOrder":
            for g in el:
                if "Group" in _local(g):
                    walk(g)
    return rank


def _parse_page(root, builder: _TextBuilder) -> Dict[str, Any]:
    if _local(root) != "PcGts":
        raise DocumentError("unsupported_xml", f"not a PAGE document (root element <{_local(root)}>)")
    pages = [el for el in root if _local(el) == "Page"]
    for pi, page in enumerate(pages):
        page_id = page.get("imageFilename") or f"page{pi + 1}"
        rank = _page_reading_order(page)
        regions = _ranked(page.iter("{*}TextRegion"), rank, page, "id")
        for region in regions:
            region_id = region.get("id")
            builder.sep("\n")
            for line in region:
                if _local(line) != "TextLine":
                    continue
                line_id = line.get("id")
                builder.sep(" ")
                words = [w for w in line if _local(w) == "Word"]
                # without a Word level the line is the finest source unit
                units, extra = (words, {}) if words else ([line], {"granularity": "line"})
                for unit in units:
                    text, conf = _page_text_equiv(unit)
                    if not text or not text.strip():
                        continue
                    poly = _page_points(unit)
                    for piece in text.split():
                        builder.add(piece, [{
                            "id": unit.get("id"),
                            "text": text,
                            "box": _box_from_points(poly) if poly else None,
                            "polygon": poly,
                            "conf": conf,
                            "page": page_id,
                            "block": region_id,
                            "line": line_id,
                            **extra,
                        }])
                        builder.sep(" ")
    return {}


def _decode(data: bytes, encoding: str) -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DocumentError("undecodable", f"undecodable bytes ({encoding}): {e}") from None
    except LookupError:
        raise ArchiveError(f"unknown encoding {encoding!r}") from None
    return text.lstrip("\ufeff")


def parse_document(
    desc: Dict[str, Any], max_bytes: int = DEFAULT_MAX_BYTES, encoding: str = "utf-8"
) -> Dict[str, Any]:
    """Descriptor → parsed document (plain dict).  Never raises for a bad document."""
    parsed: Dict[str, Any] = {
        "key": desc["key"],
        "id": desc["key"],
        "source": desc["rel"],
        "line": desc["line"] if desc.get("line", -1) >= 0 else None,
        "format": desc["fmt"],
        "metadata": None,
        "text": "",
        "words": None,
        "info": {},
        "error": None,
    }
    try:
        if desc.get("error"):
            kind, _, msg = desc["error"].partition(":")
            raise DocumentError(kind.strip(), desc["error"])
        fmt = desc["fmt"]
        if fmt == "jsonl":
            data = desc["data"]
            line_text = _decode(data, encoding)
            try:
                obj = json.loads(line_text)
            except json.JSONDecodeError as e:
                raise DocumentError("invalid_json", f"invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise DocumentError("invalid_json", "a JSONL line must be an object with a 'text' field")
            if obj.get("id") is not None:
                parsed["id"] = str(obj["id"])
            meta = {k: v for k, v in obj.items() if k not in ("id", "text")}
            parsed["metadata"] = meta or None
            text = obj.get("text")
            if not isinstance(text, str):
                raise DocumentError("missing_text", "the JSONL object has no string 'text' field")
            parsed["text"] = text
        else:
            try:
                size = os.path.getsize(desc["path"])
            except OSError as e:
                raise DocumentError("unreadable", f"unreadable: {e}") from None
            if size > max_bytes:
                raise DocumentError("too_large", f"file is {size} bytes, more than --max-bytes ({max_bytes})")
            try:
                with open(desc["path"], "rb") as f:
                    data = f.read(max_bytes + 1)
            except OSError as e:
                raise DocumentError("unreadable", f"unreadable: {e}") from None
            if fmt == "text":
                parsed["text"] = _decode(data, encoding)
            elif fmt in ("alto", "page"):
                if not data.strip():
                    raise DocumentError("empty_text", "empty file")
                root = parse_xml(data)
                builder = _TextBuilder()
                parsed["info"] = (_parse_alto if fmt == "alto" else _parse_page)(root, builder)
                parsed["text"] = builder.text()
                parsed["words"] = builder.words
            elif fmt == "xml":
                root = parse_xml(data)
                raise DocumentError(
                    "unsupported_xml", f"XML root <{_local(root)}> is neither ALTO (<alto>) nor PAGE (<PcGts>)"
                )
            else:
                raise DocumentError("unsupported_format", f"unsupported format {fmt!r}")
        if not parsed["text"].strip():
            raise DocumentError("empty_text", "empty text")
    except DocumentError as e:
        parsed["error"] = {"type": e.kind, "message": e.message}
        parsed["text"] = ""
        parsed["words"] = None
    except Exception as e:  # never let one document stop the job
        parsed["error"] = {"type": "parse_error", "message": f"{type(e).__name__}: {e}"}
        parsed["text"] = ""
        parsed["words"] = None
    return parsed


# --------------------------------------------------------------------------------------------
# 4. Annotation
# --------------------------------------------------------------------------------------------


def _jsonable(v):
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def pipeline_info(nlp) -> Dict[str, Any]:
    """Model and profile ids: ``nlp.meta`` name/version and the ``ocrneurons_ner`` config."""
    meta = getattr(nlp, "meta", {}) or {}
    info = {
        "pipeline": f"{meta.get('lang', getattr(nlp, 'lang', ''))}_{meta.get('name', 'pipeline')}",
        "pipeline_version": meta.get("version"),
        "model": None,
        "profile": None,
    }
    try:
        if "ocrneurons_ner" in nlp.pipe_names:
            comp = nlp.get_pipe("ocrneurons_ner")
            cfg = getattr(comp, "cfg", None) or {}
            for k in ("model", "profile"):
                v = cfg.get(k) if isinstance(cfg, dict) else None
                if v is None:
                    v = getattr(comp, k, None)
                    if callable(v):
                        v = None
                if v is not None and not isinstance(v, (str, int, float)):
                    v = getattr(v, "name", None) or getattr(v, "id", None) or str(v)
                info[k] = _jsonable(v)
    except Exception:
        pass
    return info


def _span_confidence(span) -> Optional[float]:
    if span.has_extension("confidence"):
        try:
            v = span._.confidence
        except Exception:
            return None
        if v is not None:
            try:
                return round(float(v), 6)
            except (TypeError, ValueError):
                return None
    return None


class _WordIndex:
    def __init__(self, words: Optional[List[Dict[str, Any]]]):
        self.words = words or []
        self.starts = [w["start"] for w in self.words]

    def overlapping(self, start: int, end: int) -> List[Dict[str, Any]]:
        out = []
        i = bisect.bisect_right(self.starts, start)
        # hyphenated parts share the same start: step back over them
        j = i - 1
        while j >= 0 and self.words[j]["end"] > start:
            j -= 1
        for w in self.words[j + 1:]:
            if w["start"] >= end:
                break
            if w["end"] > start:
                out.append(w)
        return out


def source_words(doc, start_char: int, end_char: int) -> List[Dict[str, Any]]:
    """The source words (ALTO ``String`` / PAGE ``Word``) overlapping a character range of ``doc``."""
    data = doc.user_data.get(USER_DATA_KEY) if doc.user_data else None
    if not data or not data.get("words"):
        return []
    return _WordIndex(data["words"]).overlapping(start_char, end_char)


def _union_box(boxes: List[List[float]]):
    boxes = [b for b in boxes if b]
    if not boxes:
        return None
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def _entity_record(ent, index: Optional[_WordIndex]) -> Dict[str, Any]:
    rec: Dict[str, Any] = {
        "start": ent.start_char,
        "end": ent.end_char,
        "label": ent.label_,
        "text": ent.text,
        "confidence": _span_confidence(ent),
    }
    if index is not None:
        words = index.overlapping(ent.start_char, ent.end_char)
        rec["words"] = [
            {k: w.get(k) for k in ("id", "text", "box", "polygon", "conf", "page", "line", "hyphen") if w.get(k) is not None}
            for w in words
        ]
        pages = {w.get("page") for w in words}
        rec["box"] = _union_box([w.get("box") for w in words]) if len(pages) <= 1 else None
        confs = [w["conf"] for w in words if w.get("conf") is not None]
        rec["ocr_confidence"] = round(sum(confs) / len(confs), 6) if confs else None
    return rec


def _hipe_block(doc, parsed: Dict[str, Any], record_status: str, error: Optional[Dict[str, Any]] = None) -> str:
    lines = [f"# hipe2022:document_id = {_hipe_safe(parsed['id'])}", f"# ocrneurons:source = {_hipe_safe(parsed['source'])}"]
    if parsed.get("line") is not None:
        lines.append(f"# ocrneurons:line = {parsed['line']}")
    lines.append(f"# ocrneurons:status = {record_status}")
    if error:
        lines.append(f"# ocrneurons:error = {error['type']}: {_hipe_safe(error['message'])}")
        return "\n".join(lines) + "\n"
    words = (doc.user_data.get(USER_DATA_KEY) or {}).get("words") if doc.user_data else None
    index = _WordIndex(words) if words else None
    toks = [t for t in doc if not t.is_space]
    for k, t in enumerate(toks):
        tag = "O" if t.ent_iob_ in ("O", "") else f"{t.ent_iob_}-{t.ent_type_}"
        misc = []
        nxt_i = t.i + 1
        if not t.whitespace_ and nxt_i < len(doc) and not doc[nxt_i].is_space:
            misc.append("NoSpaceAfter")
        eol = False
        if nxt_i < len(doc) and doc[nxt_i].is_space and "\n" in doc[nxt_i].text:
            eol = True
        elif index is not None and k + 1 < len(toks):
            a = index.overlapping(t.idx, t.idx + len(t.text))
            b = index.overlapping(toks[k + 1].idx, toks[k + 1].idx + len(toks[k + 1].text))
            if a and b and a[-1].get("line") != b[0].get("line") and a[-1] is not b[0]:
                eol = True
        if eol:
            misc.append("EndOfLine")
        text = t.text.replace("\t", " ")
        lines.append("\t".join([text, tag, "O", "O", "O", "O", "O", "_", "_", "|".join(misc) or "_"]))
    return "\n".join(lines) + "\n"


def _hipe_safe(s: Any) -> str:
    return str(s).replace("\n", " ").replace("\r", " ").replace("\t", " ")


def _docbin_bytes(doc) -> bytes:
    from spacy.tokens import DocBin

    db = DocBin(store_user_data=True)
    db.add(doc)
    return db.to_bytes()


def _header(parsed: Dict[str, Any], status: str) -> Dict[str, Any]:
    return {
        "id": parsed["id"],
        "key": parsed["key"],
        "source": parsed["source"],
        "line": parsed["line"],
        "format": parsed["format"],
        "status": status,
    }


def error_result(parsed: Dict[str, Any], pinfo: Dict[str, Any], want_hipe: bool = False, want_docbin: bool = False):
    rec = _header(parsed, "error")
    rec["error"] = parsed["error"]
    rec["text_length"] = None
    rec["metadata"] = parsed.get("metadata")
    rec.update(pinfo)
    rec["entities"] = []
    return {
        "key": parsed["key"],
        "status": "error",
        "n_words": 0,
        "record": json.dumps(rec, ensure_ascii=False),
        "hipe": _hipe_block(None, parsed, "error", parsed["error"]) if want_hipe else "",
        "doc": b"",
    }


def make_doc(nlp, parsed: Dict[str, Any]):
    """Doc for a parsed document: the pipeline's tokenizer over the text rebuilt from the
    source words, with the source words (char spans, ids, boxes, confidences) in
    ``doc.user_data["ocrneurons_archive"]``."""
    doc = nlp.make_doc(parsed["text"])
    doc.user_data[USER_DATA_KEY] = {
        "id": parsed["id"],
        "key": parsed["key"],
        "source": parsed["source"],
        "format": parsed["format"],
        "words": parsed["words"],
    }
    return doc


def annotate_parsed(
    nlp,
    parsed_docs: List[Dict[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    want_hipe: bool = False,
    want_docbin: bool = False,
    include_text: bool = False,
    pinfo: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Run the pipeline on parsed documents (length-sorted batches) and build one result per
    document, in the input order.  A pipeline failure on a batch is retried document by
    document so that only the culprit becomes an error record."""
    if pinfo is None:
        pinfo = pipeline_info(nlp)
    results: List[Optional[Dict[str, Any]]] = [None] * len(parsed_docs)
    ok = [i for i, p in enumerate(parsed_docs) if p["error"] is None]
    for i, p in enumerate(parsed_docs):
        if p["error"] is not None:
            results[i] = error_result(p, pinfo, want_hipe, want_docbin)
    ok.sort(key=lambda i: (len(parsed_docs[i]["text"]), i))

    def finish(i, doc):
        results[i] = _ok_result(doc, parsed_docs[i], pinfo, want_hipe, want_docbin, include_text)

    try:
        docs = nlp.pipe((make_doc(nlp, parsed_docs[i]) for i in ok), batch_size=batch_size)
        done = []
        for i, doc in zip(ok, docs):
            done.append((i, doc))
        for i, doc in done:
            finish(i, doc)
    except Exception:
        for i in ok:
            if results[i] is not None and results[i]["status"] == "ok":
                continue
            p = parsed_docs[i]
            try:
                finish(i, nlp(make_doc(nlp, p)))
            except Exception as e:
                p = dict(p, error={"type": "pipeline_error", "message": f"{type(e).__name__}: {e}"})
                results[i] = error_result(p, pinfo, want_hipe, want_docbin)
    return results  # type: ignore[return-value]


def _n_words(doc) -> int:
    """Number of non-whitespace tokens (vectorised: iterating Tokens is slow)."""
    from spacy.attrs import IS_SPACE

    if len(doc) == 0:
        return 0
    return len(doc) - int(doc.to_array([IS_SPACE]).sum())


def _ok_result(doc, parsed, pinfo, want_hipe, want_docbin, include_text):
    words = parsed.get("words")
    index = _WordIndex(words) if words is not None else None
    rec = _header(parsed, "ok")
    rec["text_length"] = len(doc.text)
    n_tokens = _n_words(doc)
    rec["n_tokens"] = n_tokens
    rec["n_source_words"] = len(words) if words is not None else None
    rec["metadata"] = parsed.get("metadata")
    for k, v in (parsed.get("info") or {}).items():
        rec[k] = v
    rec.update(pinfo)
    if include_text:
        rec["text"] = doc.text
    rec["entities"] = [_entity_record(e, index) for e in doc.ents]
    return {
        "key": parsed["key"],
        "status": "ok",
        "n_words": n_tokens,
        "record": json.dumps(rec, ensure_ascii=False),
        "hipe": _hipe_block(doc, parsed, "ok") if want_hipe else "",
        "doc": _docbin_bytes(doc) if want_docbin else b"",
    }


# --------------------------------------------------------------------------------------------
# 5. Writing: shards, manifest, resume
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(out_dir: str) -> Tuple[List[Dict[str, Any]], bool]:
    """Committed manifest entries, and whether a torn (partial) last line was found."""
    path = os.path.join(out_dir, MANIFEST)
    entries = []
    torn = False
    if not os.path.exists(path):
        return entries, torn
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                torn = True
                break
            try:
                entries.append(json.loads(raw))
            except json.JSONDecodeError:
                torn = True
                break
    return entries, torn


class ArchiveWriter:
    """Writes results in shards of ``shard_size`` documents, in each requested format.

    A shard is written under a temporary name, fsynced, atomically renamed, and only
    then are its keys appended (and fsynced) to ``manifest.jsonl``.  On ``resume``, the
    manifest's keys are skipped and any shard file that the manifest does not list
    (written before a crash but not committed) is deleted, as are temporary files.
    """

    def __init__(
        self,
        out_dir: str,
        formats: Sequence[str] = ("jsonl",),
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        resume: bool = False,
        overwrite: bool = False,
        run_config: Optional[Dict[str, Any]] = None,
        lang: str = "xx",
    ):
        bad = [f for f in formats if f not in OUTPUT_FORMATS]
        if bad or not formats:
            raise ArchiveError(f"unknown output format(s) {bad}; expected some of {', '.join(OUTPUT_FORMATS)}")
        if shard_size < 1:
            raise ArchiveError("--shard-size must be at least 1")
        self.out_dir = os.path.abspath(out_dir)
        self.formats = list(dict.fromkeys(formats))
        self.shard_size = shard_size
        self.lang = lang
        self.buffer: List[Dict[str, Any]] = []
        self.done_keys: set = set()
        self.next_shard = 0
        self.n_ok = self.n_error = 0
        self.prev_ok = self.prev_error = 0
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ArchiveError(f"--output {out_dir!r} exists and is not a folder")
        os.makedirs(self.out_dir, exist_ok=True)
        existing = [n for n in os.listdir(self.out_dir) if _SHARD_RE.match(n) or n in (MANIFEST, SUMMARY, RUN_CONFIG)]
        if overwrite:
            for n in os.listdir(self.out_dir):
                if _SHARD_RE.match(n) or n in (MANIFEST, SUMMARY, RUN_CONFIG) or (n.startswith(".") and n.endswith(".tmp")):
                    os.remove(os.path.join(self.out_dir, n))
            existing = []
        if existing and not resume:
            raise ArchiveError(
                f"output folder {out_dir!r} already holds results ({len(existing)} files); "
                "pass --resume to continue that job or --overwrite to start over"
            )
        cfg_path = os.path.join(self.out_dir, RUN_CONFIG)
        if resume and os.path.exists(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                old = json.load(f)
            if sorted(old.get("output_formats", [])) != sorted(self.formats):
                raise ArchiveError(
                    f"--resume: the output folder was written with formats {old.get('output_formats')}, "
                    f"not {self.formats}"
                )
        if resume:
            self._recover()
        if run_config is not None:
            cfg = dict(run_config, output_formats=self.formats, shard_size=shard_size)
            _atomic_write(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False).encode("utf-8"))

    def _recover(self):
        entries, torn = read_manifest(self.out_dir)
        committed = set()
        for e in entries:
            committed.update(e.get("files", []))
            self.done_keys.update(e.get("keys", []))
            self.next_shard = max(self.next_shard, int(e["shard"]) + 1)
            self.prev_ok += int(e.get("ok", 0))
            self.prev_error += int(e.get("error", 0))
        if torn:  # rewrite the manifest without its torn last line
            data = b"".join(json.dumps(e, ensure_ascii=False).encode("utf-8") + b"\n" for e in entries)
            _atomic_write(os.path.join(self.out_dir, MANIFEST), data)
        for n in os.listdir(self.out_dir):
            p = os.path.join(self.out_dir, n)
            if (n.startswith(".") and n.endswith(".tmp")) or (_SHARD_RE.match(n) and n not in committed):
                os.remove(p)
        _fsync_dir(self.out_dir)

    def is_done(self, key: str) -> bool:
        return key in self.done_keys

    def add(self, result: Dict[str, Any]):
        self.buffer.append(result)
        if result["status"] == "ok":
            self.n_ok += 1
        else:
            self.n_error += 1
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self):
        if not self.buffer:
            return
        i = self.next_shard
        files = []
        for fmt in self.formats:
            name = SHARD_PATTERNS[fmt].format(i)
            if fmt == "jsonl":
                data = "".join(r["record"] + "\n" for r in self.buffer).encode("utf-8")
            elif fmt == "hipe":
                head = "\t".join(HIPE_COLUMNS) + "\n" + f"# hipe2022:language = {self.lang}\n"
                data = (head + "".join(r["hipe"] for r in self.buffer)).encode("utf-8")
            else:
                data = self._docbin(self.buffer)
            _atomic_write(os.path.join(self.out_dir, name), data)
            files.append(name)
        _fsync_dir(self.out_dir)
        entry = {
            "shard": i,
            "files": files,
            "ok": sum(1 for r in self.buffer if r["status"] == "ok"),
            "error": sum(1 for r in self.buffer if r["status"] != "ok"),
            "keys": [r["key"] for r in self.buffer],
        }
        with open(os.path.join(self.out_dir, MANIFEST), "ab") as f:
            f.write(json.dumps(entry, ensure_ascii=False).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.next_shard += 1
        self.buffer = []

    @staticmethod
    def _docbin(results) -> bytes:
        from spacy.tokens import DocBin

        out = DocBin(store_user_data=True)
        for r in results:
            if r["status"] == "ok" and r["doc"]:
                out.merge(DocBin(store_user_data=True).from_bytes(r["doc"]))
        return out.to_bytes()

    def close(self):
        self.flush()


# --------------------------------------------------------------------------------------------
# 6. Runners
# --------------------------------------------------------------------------------------------

_WORKER: Dict[str, Any] = {}


def import_code(code: Optional[str]):
    """Import a Python file that registers custom components (like ``spacy train --code``)."""
    if not code:
        return
    import importlib.util

    path = Path(code)
    if not path.exists():
        raise ArchiveError(f"--code file not found: {code!r}")
    name = "ocrneurons_user_code_" + re.sub(r"\W", "_", path.stem)
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]


def load_pipeline(pipeline: str, code: Optional[str] = None):
    import spacy

    import_code(code)
    try:
        return spacy.load(pipeline)
    except OSError as e:
        raise ArchiveError(f"cannot load the pipeline {pipeline!r}: {e}") from None


def _check_pipeline(pipeline: str):
    import spacy.util

    if not (Path(pipeline).exists() or spacy.util.is_package(pipeline)):
        raise ArchiveError(f"pipeline not found: {pipeline!r} (a folder written by nlp.to_disk or an installed package)")


def _init_worker(pipeline: str, code: Optional[str], opts: Dict[str, Any], n_threads: int):
    nlp = load_pipeline(pipeline, code)
    if "torch" in sys.modules:
        try:
            sys.modules["torch"].set_num_threads(max(1, n_threads))
        except Exception:
            pass
    _WORKER["nlp"] = nlp
    _WORKER["opts"] = opts
    _WORKER["pinfo"] = pipeline_info(nlp)


def _process_task(descs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    opts = _WORKER["opts"]
    parsed = [parse_document(d, opts["max_bytes"], opts["encoding"]) for d in descs]
    return annotate_parsed(
        _WORKER["nlp"],
        parsed,
        batch_size=opts["batch_size"],
        want_hipe=opts["want_hipe"],
        want_docbin=opts["want_docbin"],
        include_text=opts["include_text"],
        pinfo=_WORKER["pinfo"],
    )


def _chunks(it: Iterable[Any], n: int) -> Iterator[List[Any]]:
    buf: List[Any] = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def run_local(tasks: Iterator[List[Dict[str, Any]]], pipeline: str, code: Optional[str], opts: Dict[str, Any],
              n_process: int) -> Iterator[List[Dict[str, Any]]]:
    """Results of each task, in order.  ``n_process > 1``: a spawn pool whose workers load
    the pipeline once; at most ``2 * n_process`` tasks in flight (bounded memory)."""
    if n_process <= 1:
        if "nlp" not in _WORKER or _WORKER.get("pipeline") != (pipeline, code):
            _init_worker(pipeline, code, opts, os.cpu_count() or 1)
            _WORKER["pipeline"] = (pipeline, code)
        _WORKER["opts"] = opts
        for task in tasks:
            yield _process_task(task)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // n_process)
    with ctx.Pool(n_process, initializer=_init_worker, initargs=(pipeline, code, opts, threads)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_process_task, (task,)))
            if len(pending) >= 2 * n_process:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def annotate_archives(
    inputs: Sequence[str],
    pipeline: str,
    output: str,
    *,
    input_format: Optional[str] = None,
    output_formats: Sequence[str] = ("jsonl",),
    engine: str = "local",
    n_process: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    resume: bool = False,
    overwrite: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    encoding: str = "utf-8",
    include_text: bool = False,
    code: Optional[str] = None,
    progress: bool = True,
    count: bool = True,
    ray_options: Optional[Dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Annotate every document of ``inputs`` with ``pipeline`` into shards in ``output``.

    Returns the summary (also written to ``output/summary.json``): counts of ``done``
    (documents with entities written in this run), ``failed`` (error records written in
    this run), ``skipped`` (already in the manifest, with ``--resume``), totals and speeds.
    """
    t0 = time.time()
    if engine not in ("local", "ray"):
        raise ArchiveError(f"unknown engine {engine!r}; expected 'local' or 'ray'")
    if n_process < 1:
        raise ArchiveError("--n-process must be at least 1")
    if batch_size < 1:
        raise ArchiveError("--batch-size must be at least 1")
    input_set = InputSet(inputs)
    if input_format not in (None, "auto") and input_format not in INPUT_FORMATS:
        raise ArchiveError(f"unknown input format {input_format!r}; expected one of auto, {', '.join(INPUT_FORMATS)}")
    _check_pipeline(pipeline)
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ArchiveError(f"unknown encoding {encoding!r}") from None
    if code:
        import_code(code)
    lang = "xx"
    try:
        cfg_file = Path(pipeline) / "config.cfg"
        if cfg_file.exists():
            m = re.search(r"^lang\s*=\s*\"?([\w-]+)\"?", cfg_file.read_text(encoding="utf-8"), re.M)
            if m:
                lang = m.group(1)
    except OSError:
        pass
    run_config = {
        "inputs": [str(i) for i in inputs],
        "pipeline": str(pipeline),
        "input_format": input_format or "auto",
        "engine": engine,
    }
    writer = ArchiveWriter(
        output, output_formats, shard_size=shard_size, resume=resume, overwrite=overwrite,
        run_config=run_config, lang=lang,
    )
    opts = {
        "max_bytes": max_bytes,
        "encoding": encoding,
        "batch_size": batch_size,
        "want_hipe": "hipe" in writer.formats,
        "want_docbin": "docbin" in writer.formats,
        "include_text": include_text,
    }
    total = count_documents(input_set, input_format, max_bytes) if (count and progress) else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="doc", desc="annotate", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    stats = {"skipped": 0, "words": 0, "docs": 0}

    def todo() -> Iterator[Dict[str, Any]]:
        for d in iter_descriptors(input_set, input_format, max_bytes):
            if writer.is_done(d["key"]):
                stats["skipped"] += 1
                if bar is not None:
                    bar.update(1)
                continue
            yield d

    task_size = max(1, batch_size * 4)
    t_start = time.time()
    t_first = None
    try:
        if engine == "ray":
            from .archives_ray import run_ray

            batches = run_ray(todo(), pipeline, code, opts, **(ray_options or {}))
        else:
            batches = run_local(_chunks(todo(), task_size), pipeline, code, opts, n_process)
        for results in batches:
            if t_first is None:  # steady-state speed: from the first result on (excludes start-up)
                t_first = time.time()
                stats["first_docs"] = len(results)
                stats["first_words"] = sum(r["n_words"] for r in results)
            for r in results:
                writer.add(r)
                stats["words"] += r["n_words"]
                stats["docs"] += 1
            if bar is not None:
                bar.update(len(results))
                el = max(time.time() - t_start, 1e-9)
                bar.set_postfix_str(f"{stats['words'] / el:,.0f} words/s, {writer.n_error} failed", refresh=False)
        writer.close()
    finally:
        if bar is not None:
            bar.close()
    t_end = time.time()
    elapsed = t_end - t0
    if t_first is not None and t_end - t_first > 0 and stats["docs"] > stats["first_docs"]:
        proc = t_end - t_first
        rate_docs = stats["docs"] - stats["first_docs"]
        rate_words = stats["words"] - stats["first_words"]
    else:
        proc = max(t_end - t_start, 1e-9)
        rate_docs, rate_words = stats["docs"], stats["words"]
    summary = {
        "done": writer.n_ok,
        "failed": writer.n_error,
        "skipped": stats["skipped"],
        "documents": writer.n_ok + writer.n_error + stats["skipped"],
        "total_done": writer.prev_ok + writer.n_ok,
        "total_failed": writer.prev_error + writer.n_error,
        "words": stats["words"],
        "shards": writer.next_shard,
        "elapsed_s": round(elapsed, 3),
        "startup_s": round((t_first or t_end) - t_start, 3),
        "docs_per_s": round(rate_docs / proc, 2),
        "words_per_s": round(rate_words / proc, 1),
        "engine": engine,
        "n_process": n_process if engine == "local" else None,
        "output_formats": writer.formats,
        "pipeline": str(pipeline),
    }
    _atomic_write(os.path.join(writer.out_dir, SUMMARY), json.dumps(summary, indent=2).encode("utf-8"))
    if log is not None:
        log(
            f"annotate: {summary['documents']} documents: {summary['done']} done, {summary['failed']} failed, "
            f"{summary['skipped']} skipped in {elapsed:.1f} s ({summary['docs_per_s']:.1f} docs/s, "
            f"{summary['words_per_s']:,.0f} words/s) -> {writer.out_dir}"
        )
    return summary


# --------------------------------------------------------------------------------------------
# Reading results back
# --------------------------------------------------------------------------------------------


def _committed_files(out_dir: str, fmt: str) -> List[str]:
    entries, _ = read_manifest(out_dir)
    prefix = SHARD_PATTERNS[fmt].split("-")[0]
    return [os.path.join(out_dir, f) for e in entries for f in e["files"] if f.startswith(prefix)]


def read_records(out_dir: str) -> Iterator[Dict[str, Any]]:
    """The JSONL records of an output folder, in shard order (committed shards only)."""
    for path in _committed_files(out_dir, "jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def read_docs(out_dir: str, vocab=None) -> Iterator[Any]:
    """The ``Doc`` objects of an output folder's DocBin shards (needs a vocab, default blank)."""
    from spacy.tokens import DocBin
    from spacy.vocab import Vocab

    vocab = vocab or Vocab()
    for path in _committed_files(out_dir, "docbin"):
        yield from DocBin(store_user_data=True).from_disk(path).get_docs(vocab)


def read_hipe(out_dir: str) -> Iterator[Dict[str, Any]]:
    """Documents of the HIPE TSV shards: ``{"id", "status", "tokens": [(token, tag, misc)]}``."""
    for path in _committed_files(out_dir, "hipe"):
        cur: Optional[Dict[str, Any]] = None
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line or line.startswith("TOKEN\t"):
                    continue
                if line.startswith("# hipe2022:document_id = "):
                    if cur is not None:
                        yield cur
                    cur = {"id": line.split(" = ", 1)[1], "status": None, "tokens": []}
                elif line.startswith("# ocrneurons:status = ") and cur is not None:
                    cur["status"] = line.split(" = ", 1)[1]
                elif line.startswith("#"):
                    continue
                elif cur is not None:
                    cols = line.split("\t")
                    cur["tokens"].append((cols[0], cols[1], cols[-1]))
        if cur is not None:
            yield cur


def hipe_entities(tokens: List[Tuple[str, str, str]]) -> List[Tuple[str, str]]:
    """``(label, text)`` of the entities of a HIPE document (text rebuilt with NoSpaceAfter)."""
    ents: List[Tuple[str, str]] = []
    cur_label = None
    cur_text = ""
    prev_nospace = False
    for tok, tag, misc in tokens:
        if tag.startswith("B-") or (tag.startswith("I-") and cur_label != tag[2:]):
            if cur_label is not None:
                ents.append((cur_label, cur_text))
            cur_label, cur_text = tag[2:], tok
        elif tag.startswith("I-"):
            cur_text += ("" if prev_nospace else " ") + tok
        else:
            if cur_label is not None:
                ents.append((cur_label, cur_text))
            cur_label, cur_text = None, ""
        prev_nospace = "NoSpaceAfter" in misc.split("|")
    if cur_label is not None:
        ents.append((cur_label, cur_text))
    return ents
