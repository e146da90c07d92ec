"""OCR-like noise for tokenized, labelled sentences (labels follow the text).

Two methods:

* ``"nlpaug"``: ``nlpaug.augmenter.char.OcrAug`` at the three levels of Boros & Ehrmann (arXiv 2409.16934):
  low (``aug_char_min=1, aug_char_max=1, aug_char_p=0.1, aug_word_p=0.1``), medium (chars 2-5, p=0.6) and
  high (chars 3-10, p=0.9). The whole sentence is given to OcrAug with a tokenizer that returns our tokens, so
  ``aug_word_p`` is the share of tokens picked and the token count never changes. OcrAug only changes characters
  found in its OCR map (digits, ``o r l I s S g q u k b z Z C G O D U E B``...): a picked token without such
  characters (``été``, ``,``) stays as it is, so the achieved error rate is below the nominal one.
  Measured on HIPE-2020 fr dev (seed 0): CER/WER low 1.5%/7.2%, medium 16.6%/38.6%, high 25.1%/57.3%;
  typed presets: low 1.6%/8.5%, medium 8.4%/34.7%, high 19.1%/59.3%.
* ``"typed"``: our own typed OCR distortions, each with its own probability (:class:`NoiseConfig`): character
  confusions (French diacritics, long s and ligatures, classic OCR confusions such as ``rn``/``m``), insertions,
  deletions, word splits and word merges.

**Label rule** (both methods, :func:`realign_tags`): every noisy token records the original tokens its characters
come from (``alignment``). A noisy token takes the entity of the *first* original entity among its sources; it is
``B-`` when the previous noisy token does not carry the same entity, else ``I-``. Hence a split inside an entity
gives ``B-x I-x``; a merge of an ``O`` token with an entity token carries the entity; deletions never empty a token,
so no entity loses all its tokens. The number of entities is unchanged, except when every token of an entity is
merged into tokens that already carry an earlier entity (e.g. ``Paris`` B-loc + ``Lyon`` B-loc -> ``ParisLyon``
B-loc): the later entity is then absorbed, and counted in ``NoisySentence.merged_entities``. A longer entity whose
first token is merged into the previous entity survives, one token shorter.

OcrAug only touches tokens holding a character of its map: on the HIPE-2020 French dev set about 37% of the tokens
(``de``, ``été``, punctuation ...) hold none and are never changed. OcrAug is used with ``aug_word_max=None``
(nlpaug's default caps the picked words at 10 per input) and ``min_char=1``.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .hipe import (
    BIO_COLUMNS,
    END_OF_LINE,
    END_OF_SENTENCE,
    NO_SPACE_AFTER,
    HipeDocument,
    HipeToken,
    bio_spans,
)

PathLike = Union[str, Path]

# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------

#: OcrAug parameters per level, as in the paper. ``aug_word_max=None``: no cap on the number of words picked
#: (nlpaug's default cap of 10 words per input would make ``aug_word_p`` meaningless on long sentences).
NLPAUG_LEVELS: Dict[str, Dict[str, Any]] = {
    "low": dict(aug_char_min=1, aug_char_max=1, aug_char_p=0.1, aug_word_p=0.1),
    "medium": dict(aug_char_min=2, aug_char_max=5, aug_char_p=0.6, aug_word_p=0.6),
    "high": dict(aug_char_min=3, aug_char_max=10, aug_char_p=0.9, aug_word_p=0.9),
}
LEVELS = ("low", "medium", "high")


@dataclass
class NoiseConfig:
    """Probabilities of the typed distortions.

    Character probabilities apply per opportunity (each position where a rule of that kind matches, scaled by
    the rule's weight); ``split_p`` per token (of 2+ characters); ``merge_p`` per space between two tokens.
    """

    diacritic_p: float = 0.0  # é->e, è->e, à->a, ç->c, ô->o ... (and, rarely, e->é)
    long_s_p: float = 0.0  # s->ſ, f->ſ, ſ->f, ſ->s
    ligature_p: float = 0.0  # fi<->ﬁ, ff<->ﬀ, fl<->ﬂ, œ<->oe, æ<->ae
    confusion_p: float = 0.0  # rn<->m, cl<->d, li<->h, l/1/I, O<->0, e<->c, u<->n, vv<->w ...
    insert_p: float = 0.0  # a spurious character after a character
    delete_p: float = 0.0  # a character dropped (never the last one of a token)
    split_p: float = 0.0  # a token becomes two tokens
    merge_p: float = 0.0  # two tokens separated by a space become one

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"NoiseConfig.{f.name} must be a probability in [0, 1], got {v!r}")

    @classmethod
    def preset(cls, level: str) -> "NoiseConfig":
        """The named preset ``low``, ``medium`` or ``high``."""
        if level not in TYPED_PRESETS:
            raise ValueError(f"unknown noise level {level!r}; choose one of {', '.join(TYPED_PRESETS)}")
        return cls(**asdict(TYPED_PRESETS[level]))

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


TYPED_PRESETS: Dict[str, NoiseConfig] = {
    "low": NoiseConfig(
        diacritic_p=0.05, long_s_p=0.02, ligature_p=0.05, confusion_p=0.02, insert_p=0.003, delete_p=0.003,
        split_p=0.01, merge_p=0.01,
    ),
    "medium": NoiseConfig(
        diacritic_p=0.3, long_s_p=0.12, ligature_p=0.3, confusion_p=0.12, insert_p=0.015, delete_p=0.015,
        split_p=0.04, merge_p=0.04,
    ),
    "high": NoiseConfig(
        diacritic_p=0.6, long_s_p=0.3, ligature_p=0.6, confusion_p=0.3, insert_p=0.04, delete_p=0.04,
        split_p=0.08, merge_p=0.08,
    ),
}

# (source, replacements, weight): a rule fires with probability p * weight where ``source`` matches.
_DIACRITIC_RULES: List[Tuple[str, Tuple[str, ...], float]] = [
    ("é", ("e", "è", "ë"), 1.0), ("è", ("e", "é"), 1.0), ("ê", ("e", "é", "è"), 1.0), ("ë", ("e", "é"), 1.0),
    ("à", ("a", "á"), 1.0), ("â", ("a", "à"), 1.0), ("ç", ("c", "e"), 1.0), ("ô", ("o", "ö", "6"), 1.0),
    ("û", ("u", "ü"), 1.0), ("ù", ("u",), 1.0), ("î", ("i", "ï", "l"), 1.0), ("ï", ("i", "î"), 1.0),
    ("É", ("E",), 1.0), ("È", ("E",), 1.0), ("Ê", ("E",), 1.0), ("À", ("A",), 1.0), ("Ç", ("C",), 1.0),
    ("Ô", ("O",), 1.0), ("Î", ("I",), 1.0),
    ("e", ("é", "è"), 0.1), ("a", ("à",), 0.05), ("c", ("ç",), 0.05), ("o", ("ô",), 0.05), ("u", ("û", "ù"), 0.05),
]
_LONG_S_RULES: List[Tuple[str, Tuple[str, ...], float]] = [
    ("s", ("ſ",), 1.0), ("f", ("ſ",), 0.3), ("ſ", ("f", "s"), 1.0),
]
_LIGATURE_RULES: List[Tuple[str, Tuple[str, ...], float]] = [
    ("fi", ("ﬁ",), 1.0), ("ﬁ", ("fi",), 1.0), ("ff", ("ﬀ",), 1.0), ("ﬀ", ("ff",), 1.0), ("fl", ("ﬂ",), 1.0),
    ("ﬂ", ("fl",), 1.0), ("œ", ("oe", "ce", "œ"), 1.0), ("oe", ("œ",), 1.0), ("Œ", ("OE", "CE"), 1.0),
    ("OE", ("Œ",), 1.0), ("æ", ("ae",), 1.0), ("ae", ("æ",), 0.5), ("ct", ("ﬅ",), 0.2), ("st", ("ﬆ",), 0.2),
]
_CONFUSION_RULES: List[Tuple[str, Tuple[str, ...], float]] = [
    ("rn", ("m",), 1.0), ("m", ("rn", "in", "nn"), 0.5), ("cl", ("d",), 1.0), ("d", ("cl",), 0.3),
    ("li", ("h",), 1.0), ("h", ("li", "b"), 0.3), ("vv", ("w",), 1.0), ("w", ("vv",), 1.0), ("ri", ("n",), 0.3),
    ("l", ("1", "I", "i"), 0.5), ("1", ("l", "I"), 1.0), ("I", ("l", "1"), 1.0), ("i", ("l", "1", "í"), 0.2),
    ("O", ("0", "Q"), 1.0), ("0", ("O", "o"), 1.0), ("o", ("0", "c"), 0.3), ("e", ("c", "o"), 0.3), ("c", ("e",), 0.5),
    ("u", ("n", "ii"), 0.4), ("n", ("u", "ri"), 0.4), ("b", ("h", "6"), 0.5), ("S", ("5", "8"), 0.5), ("5", ("S",), 1.0),
    ("B", ("8", "E"), 0.5), ("8", ("B", "3"), 1.0), ("g", ("q", "9"), 0.5), ("q", ("g",), 0.5), ("t", ("f", "l"), 0.2),
    ("f", ("t",), 0.3), ("a", ("o", "n"), 0.15), ("s", ("8",), 0.1), ("E", ("F", "B"), 0.3), ("F", ("E", "P"), 0.3),
    (",", (".", ";"), 0.5), (".", (",", ":"), 0.5), ("'", ("’", ","), 0.5),
]
_INSERT_CHARS = "'.,-:;^~°|il1"
_CATEGORIES = (("ligature_p", _LIGATURE_RULES), ("long_s_p", _LONG_S_RULES), ("diacritic_p", _DIACRITIC_RULES),
               ("confusion_p", _CONFUSION_RULES))
_RULE_INDEX: Dict[str, Dict[str, List[Tuple[str, Tuple[str, ...], float]]]] = {}
for _name, _rules in _CATEGORIES:
    idx: Dict[str, List[Tuple[str, Tuple[str, ...], float]]] = {}
    for _rule in sorted(_rules, key=lambda r: -len(r[0])):
        idx.setdefault(_rule[0][0], []).append(_rule)
    _RULE_INDEX[_name] = idx


# --------------------------------------------------------------------------------------------
# results, alignment and label re-alignment
# --------------------------------------------------------------------------------------------


@dataclass
class NoisySentence:
    """A noisy copy of a sentence. ``alignment[j]``: indices of the original tokens noisy token ``j`` comes from."""

    words: List[str]
    tags: List[str]
    spaces: List[bool]
    alignment: List[List[int]]
    merged_entities: int = 0

    def aligned_pairs(self, clean_words: Sequence[str]) -> List[Tuple[str, str]]:
        """(clean, noisy) word pairs: 1-1 where the token count is kept, joined groups around splits/merges."""
        pairs: List[Tuple[str, str]] = []
        j = 0
        while j < len(self.words):
            src = set(self.alignment[j])
            k = j + 1
            while k < len(self.words) and src & set(self.alignment[k]):
                src |= set(self.alignment[k])
                k += 1
            pairs.append(("".join(clean_words[i] for i in sorted(src)), "".join(self.words[j:k])))
            j = k
        return pairs


def realign_tags(tags: Sequence[str], alignment: Sequence[Sequence[int]]) -> Tuple[List[str], int]:
    """IOB tags for noisy tokens from the original ``tags`` and the token ``alignment`` (see the module doc).

    Returns ``(new_tags, merged_entities)``; outside tokens keep the original outside value (``O`` or ``_``).
    An entity whose first tag was written ``I-x`` in the source (an orphan, or an entity continued from the
    previous sentence) keeps that ``I-x`` when it cannot join a preceding ``x`` entity, so writing a noisy
    copy changes neither the number nor the extent of entities.
    """
    spans = bio_spans(tags)
    ent_of = {}
    for e, (s, t, _lab) in enumerate(spans):
        for i in range(s, t):
            ent_of[i] = e
    new_tags: List[str] = []
    prev_ent = None
    seen = set()
    for src in alignment:
        ents = [ent_of[i] for i in src if i in ent_of]
        if not ents:
            outside = [tags[i] for i in src if not tags[i].startswith(("B-", "I-"))]
            new_tags.append(outside[0] if outside else "O")
            prev_ent = None
            continue
        e = min(ents)
        seen.add(e)
        label = spans[e][2]
        if prev_ent == e:
            new_tags.append("I-" + label)
        else:
            first = spans[e][0]
            prev_tag = new_tags[-1] if new_tags else "O"
            keep_i = (
                first in src
                and tags[first].startswith("I-")  # the source wrote this entity start as I- (orphan, or continued
                and not (prev_tag.startswith(("B-", "I-")) and prev_tag[2:] == label)  # from the previous sentence)
            )
            new_tags.append(("I-" if keep_i else "B-") + label)
        prev_ent = e
    return new_tags, len(spans) - len(seen)


def _derive_seed(*parts: Any) -> int:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big")


# --------------------------------------------------------------------------------------------
# typed distortions
# --------------------------------------------------------------------------------------------


def _distort_chars(word: str, cfg: NoiseConfig, rng: random.Random) -> str:
    """Character-level distortions of one token (never returns an empty string for a non-empty word)."""
    out: List[str] = []
    k, n = 0, len(word)
    while k < n:
        applied = False
        for name, _rules in _CATEGORIES:
            p = getattr(cfg, name)
            if p <= 0:
                continue
            for src, repl, weight in _RULE_INDEX[name].get(word[k], ()):
                if word.startswith(src, k) and rng.random() < p * weight:
                    if src == "s" and repl == ("ſ",) and (k == n - 1):
                        continue  # historical long s never ends a word
                    out.append(rng.choice(repl))
                    k += len(src)
                    applied = True
                    break
            if applied:
                break
        if not applied:
            out.append(word[k])
            k += 1
        if cfg.insert_p and rng.random() < cfg.insert_p:
            out.append(rng.choice(_INSERT_CHARS + (out[-1][-1] if out and out[-1] else "")))
    if cfg.delete_p and len(out) > 1:
        kept = [c for c in out if rng.random() >= cfg.delete_p]
        if not kept:  # never delete a token entirely
            kept = [out[rng.randrange(len(out))]]
        out = kept
    result = "".join(out)
    return result if result else word


def _noise_typed(
    words: Sequence[str], spaces: Sequence[bool], cfg: NoiseConfig, rng: random.Random, no_merge_before: Iterable[int] = ()
) -> Tuple[List[str], List[bool], List[List[int]]]:
    blocked = set(no_merge_before)
    # 1. characters
    toks: List[Tuple[str, bool, List[int]]] = []
    for i, (w, sp) in enumerate(zip(words, spaces)):
        toks.append((_distort_chars(w, cfg, rng), sp, [i]))
    # 2. splits (a space is inserted inside a token)
    if cfg.split_p:
        split: List[Tuple[str, bool, List[int]]] = []
        for w, sp, src in toks:
            if len(w) >= 2 and rng.random() < cfg.split_p:
                cut = rng.randrange(1, len(w))
                split.append((w[:cut], True, list(src)))
                split.append((w[cut:], sp, list(src)))
            else:
                split.append((w, sp, src))
        toks = split
    # 3. merges (the space between two tokens is lost)
    if cfg.merge_p and toks:
        merged = [toks[0]]
        for w, sp, src in toks[1:]:
            pw, psp, psrc = merged[-1]
            if psp and src[0] not in blocked and psrc != src and rng.random() < cfg.merge_p:
                merged[-1] = (pw + w, sp, sorted(set(psrc) | set(src)))
            else:
                merged.append((w, sp, src))
        toks = merged
    return [t[0] for t in toks], [t[1] for t in toks], [t[2] for t in toks]


# --------------------------------------------------------------------------------------------
# nlpaug
# --------------------------------------------------------------------------------------------

_SEP = "\x00"
_AUG_CACHE: Dict[Tuple, Any] = {}


def _ocr_aug(level: str, **overrides: Any):
    if level not in NLPAUG_LEVELS:
        raise ValueError(f"unknown nlpaug level {level!r}; choose one of {', '.join(NLPAUG_LEVELS)}")
    params = dict(NLPAUG_LEVELS[level], aug_word_max=None, aug_word_min=1, min_char=1)
    params.update(overrides)
    key = (level, tuple(sorted(params.items())))
    if key not in _AUG_CACHE:
        import nlpaug.augmenter.char as nac

        _AUG_CACHE[key] = nac.OcrAug(
            tokenizer=lambda text: text.split(_SEP), reverse_tokenizer=lambda toks: _SEP.join(toks), **params
        )
    return _AUG_CACHE[key]


def _noise_nlpaug(words: Sequence[str], level: str, seed: int, **overrides: Any) -> List[str]:
    """OcrAug on the whole sentence, token count preserved; seeded, and the global RNG states are restored."""
    import numpy as np

    if not words:
        return []
    if any(_SEP in w for w in words):
        raise ValueError("words must not contain NUL characters")
    aug = _ocr_aug(level, **overrides)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        text = _SEP.join(words)
        out = aug.augment(text)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    out = out[0] if isinstance(out, list) else out
    noisy = out.split(_SEP) if out else list(words)
    if len(noisy) != len(words):  # OcrAug strips the input; keep edge tokens that were whitespace-only
        raise RuntimeError(f"nlpaug changed the token count ({len(words)} -> {len(noisy)}) for {words!r}")
    return noisy


# --------------------------------------------------------------------------------------------
# public API: sentences
# --------------------------------------------------------------------------------------------


def noise_sentence(
    words: Sequence[str],
    tags: Optional[Sequence[str]] = None,
    spaces: Optional[Sequence[bool]] = None,
    *,
    method: str = "typed",
    level: str = "medium",
    config: Optional[NoiseConfig] = None,
    seed: Optional[int] = None,
    rng: Optional[random.Random] = None,
    no_merge_before: Iterable[int] = (),
    nlpaug_params: Optional[Dict[str, Any]] = None,
) -> NoisySentence:
    """A noisy copy of one tokenized sentence; ``tags`` (IOB) follow the text (see the module doc).

    ``method``: ``"nlpaug"`` (OcrAug at ``level``; token count unchanged) or ``"typed"`` (``config``, or the
    preset ``level``). Randomness: ``seed`` (an int), or a value drawn from ``rng``; the same seed gives the
    same output whatever was called before. ``no_merge_before``: token indices that must not be merged with
    the previous token. ``nlpaug_params`` override OcrAug parameters.
    """
    words = list(words)
    tags = list(tags) if tags is not None else ["O"] * len(words)
    spaces = list(spaces) if spaces is not None else [True] * len(words)
    if not (len(words) == len(tags) == len(spaces)):
        raise ValueError(f"words/tags/spaces lengths differ: {len(words)}/{len(tags)}/{len(spaces)}")
    if any(not w for w in words):
        raise ValueError(f"empty word in {words!r}")
    if seed is None:
        seed = rng.getrandbits(63) if rng is not None else 0
    if method == "nlpaug":
        noisy = _noise_nlpaug(words, level, seed, **(nlpaug_params or {}))
        alignment = [[i] for i in range(len(words))]
        return NoisySentence(noisy, list(tags), list(spaces), alignment, 0)
    if method != "typed":
        raise ValueError(f"method must be 'nlpaug' or 'typed', got {method!r}")
    cfg = config if config is not None else NoiseConfig.preset(level)
    new_words, new_spaces, alignment = _noise_typed(words, spaces, cfg, random.Random(seed), no_merge_before)
    new_tags, merged = realign_tags(tags, alignment)
    return NoisySentence(new_words, new_tags, new_spaces, alignment, merged)


# --------------------------------------------------------------------------------------------
# error rates
# --------------------------------------------------------------------------------------------


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insertions, deletions, substitutions; unit costs) between two sequences.

    Exact; uses the bit-parallel algorithm of Myers (1999) / Hyyrö (2003) on Python integers, so long
    sentences cost O(len(a) * len(b) / word size).
    """
    start = 0  # strip the common prefix and suffix: noise is sparse
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    m = len(b)
    if not a or not m:
        return len(a) + m
    peq: Dict[Any, int] = {}
    for i, item in enumerate(b):
        peq[item] = peq.get(item, 0) | (1 << i)
    mask = (1 << m) - 1
    high = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for item in a:
        eq = peq.get(item, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = (mv | ~(xh | pv)) & mask
        mh = pv & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv
    return score


def _levenshtein_dp(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Reference dynamic-programming edit distance (used in tests)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@dataclass
class ErrorCounts:
    """Summed edit distances and reference lengths, for corpus-level CER/WER."""

    char_edits: int = 0
    chars: int = 0
    word_edits: int = 0
    words: int = 0

    def add(self, clean_words: Sequence[str], noisy_words: Sequence[str]) -> None:
        clean_text, noisy_text = " ".join(clean_words), " ".join(noisy_words)
        self.char_edits += levenshtein(clean_text, noisy_text)
        self.chars += len(clean_text)
        self.word_edits += levenshtein(list(clean_words), list(noisy_words))
        self.words += len(clean_words)

    @property
    def cer(self) -> float:
        return self.char_edits / self.chars if self.chars else 0.0

    @property
    def wer(self) -> float:
        return self.word_edits / self.words if self.words else 0.0


def error_rates(clean_words: Sequence[str], noisy_words: Sequence[str]) -> Tuple[float, float]:
    """(CER, WER): Levenshtein distance of the space-joined texts / reference characters, and of the word
    sequences / reference words."""
    counts = ErrorCounts()
    counts.add(clean_words, noisy_words)
    return counts.cer, counts.wer


# --------------------------------------------------------------------------------------------
# HIPE documents and DocBins
# --------------------------------------------------------------------------------------------


def _noisy_hipe_tokens(
    toks: Sequence[HipeToken], sentence: NoisySentence, tag_column: str
) -> List[HipeToken]:
    """Build HIPE tokens for a noisy sentence: IOB columns re-aligned, other values from the source tokens."""
    bio_cols = [c for c in BIO_COLUMNS if any(c in t.values for t in toks)]
    realigned = {}
    for col in bio_cols:
        if col == tag_column:
            realigned[col] = sentence.tags
        else:
            realigned[col] = realign_tags([t.get(col, "O") for t in toks], sentence.alignment)[0]
    out: List[HipeToken] = []
    n = len(sentence.words)
    for j, (word, space, src) in enumerate(zip(sentence.words, sentence.spaces, sentence.alignment)):
        first = toks[src[0]]
        # values (NEL, LED, Partial, ...) from the first source token carrying an entity in the tag column
        carrier = next((toks[i] for i in src if toks[i].get(tag_column, "O").startswith(("B-", "I-"))), first)
        values = dict(carrier.values)
        for col in bio_cols:
            values[col] = realigned[col][j]
        last_piece = j == n - 1 or src[-1] not in sentence.alignment[j + 1]
        last_src = toks[src[-1]]
        flags = [f for f in carrier.flags if f not in (NO_SPACE_AFTER, END_OF_LINE, END_OF_SENTENCE)]
        if not space:
            flags.append(NO_SPACE_AFTER)
        if last_piece and last_src.end_of_line:
            flags.append(END_OF_LINE)
        if last_piece and last_src.end_of_sentence:
            flags.append(END_OF_SENTENCE)
        if "MISC" in values or flags:
            values["MISC"] = "|".join(flags) if flags else "_"
        out.append(HipeToken(word, values))
    return out


def noise_hipe_docs(
    hipe_docs: Iterable[HipeDocument],
    *,
    method: str = "typed",
    level: str = "medium",
    config: Optional[NoiseConfig] = None,
    seed: int = 0,
    column: str = "NE-COARSE-LIT",
    counts: Optional[ErrorCounts] = None,
    progress: bool = False,
) -> List[HipeDocument]:
    """Noisy copies of HIPE documents, sentence by sentence (merges never cross a sentence or segment).

    Each sentence gets its own seed derived from ``seed``, the document id and the sentence position, so results
    do not depend on processing order. Comments and layout are kept; ``doc.meta["alignment"]`` maps each noisy
    token to original token indices. ``counts`` (optional) accumulates CER/WER.
    """
    docs = list(hipe_docs)
    out: List[HipeDocument] = []
    iterator: Iterable = docs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(docs, desc=f"noise ({method}, {level})", unit="doc")
    for k, doc in enumerate(iterator):
        new_tokens: List[HipeToken] = []
        alignment: List[List[int]] = []
        inner: Dict[int, List[str]] = {}
        cuts = sorted(set([b for _, b in doc.sentence_spans()] + [i for i in doc.inner_lines if i > 0]))
        bounds = [0] + [c for c in cuts if 0 < c < len(doc.tokens)] + [len(doc.tokens)]
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            if b <= a:
                continue
            toks = doc.tokens[a:b]
            if a in doc.inner_lines:
                inner[len(new_tokens)] = list(doc.inner_lines[a])
            words = [t.text for t in toks]
            tags = [t.get(column, "O") for t in toks]
            spaces = [not t.no_space_after for t in toks]
            sent = noise_sentence(
                words, tags, spaces, method=method, level=level, config=config,
                seed=_derive_seed(seed, doc.id or k, a),
            )
            if counts is not None:
                counts.add(words, sent.words)
            new_tokens.extend(_noisy_hipe_tokens(toks, sent, column))
            alignment.extend([[a + i for i in src] for src in sent.alignment])
        new_doc = HipeDocument(
            tokens=new_tokens, comments=list(doc.comments), columns=doc.columns, inner_lines=inner,
            trailing_lines=None if doc.trailing_lines is None else list(doc.trailing_lines), meta=dict(doc.meta),
        )
        new_doc.meta["alignment"] = alignment
        out.append(new_doc)
    return out


def noise_docbin(
    in_path: PathLike,
    out_path: PathLike,
    *,
    method: str = "typed",
    level: str = "medium",
    config: Optional[NoiseConfig] = None,
    seed: int = 0,
    progress: bool = False,
) -> ErrorCounts:
    """Noisy copy of a ``.spacy`` DocBin: same number and order of Docs, ents re-aligned, sentence starts kept.

    Docs made by :mod:`spacy_ocrneurons.hipe` keep their HIPE info (so the result can be written as TSV); each
    noisy Doc has ``user_data["ocrnoise_alignment"]`` (noisy token -> original token indices).
    Returns the achieved error counts.
    """
    from spacy.tokens import Doc, Span

    from .hipe import DOC_EXT, TOKEN_EXT, blank_vocab, doc_bio_tags, read_docbin, register_extensions, write_docbin

    register_extensions()
    docs = read_docbin(in_path)
    vocab = docs[0].vocab if docs else blank_vocab(None)
    counts = ErrorCounts()
    out_docs = []
    iterator: Iterable = docs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(docs, desc=f"noise ({method}, {level})", unit="doc")
    for n, doc in enumerate(iterator):
        info = doc._.get(DOC_EXT)
        tags = doc_bio_tags(doc)
        if doc.has_annotation("SENT_START"):
            bounds = [(s.start, s.end) for s in doc.sents]
        else:
            bounds = [(0, len(doc))] if len(doc) else []
        if info is not None:  # keep the inner-line (segment comment) positions as merge barriers
            extra = {int(i) for i in info.get("inner_lines", {}) if 0 < int(i) < len(doc)}
            cuts = sorted({b for _, b in bounds} | extra)
            bounds = [(a, b) for a, b in zip([0] + cuts, cuts) if b > a]
        words, spaces, new_tags, sent_starts, alignment, hipe_values = [], [], [], [], [], []
        inner_map: Dict[int, int] = {}
        for a, b in bounds:
            w = [t.text for t in doc[a:b]]
            sp = [bool(t.whitespace_) for t in doc[a:b]]
            doc_key = info.get("doc_id") if info else None
            sent = noise_sentence(
                w, tags[a:b], sp, method=method, level=level, config=config,
                seed=_derive_seed(seed, doc_key or n, info.get("part", 0) if info else 0, a),
            )
            counts.add(w, sent.words)
            inner_map[a] = len(words)
            if info is not None:
                htoks = [HipeToken(t.text, dict(t._.get(TOKEN_EXT) or {})) for t in doc[a:b]]
                column = info.get("column", "NE-COARSE-LIT")
                for ht, tag in zip(htoks, tags[a:b]):  # the Doc's ents are the truth for the tag column
                    ht.values[column] = tag
                hipe_values.extend(t.values for t in _noisy_hipe_tokens(htoks, sent, column))
            sent_starts.extend([True] + [False] * (len(sent.words) - 1))
            words.extend(sent.words)
            spaces.extend(sent.spaces)
            new_tags.extend(sent.tags)
            alignment.extend([[a + i for i in src] for src in sent.alignment])
        new_doc = Doc(vocab, words=words, spaces=spaces, sent_starts=sent_starts if words else None)
        new_doc.ents = [Span(new_doc, s, e, label=lab) for s, e, lab in bio_spans(new_tags)]
        if info is not None:
            new_info = dict(info)
            new_info["inner_lines"] = {inner_map.get(int(i), int(i)): list(v) for i, v in info.get("inner_lines", {}).items()}
            new_doc._.set(DOC_EXT, new_info)
            for tok, values in zip(new_doc, hipe_values):
                tok._.set(TOKEN_EXT, values)
        new_doc.user_data["ocrnoise_alignment"] = alignment
        out_docs.append(new_doc)
    write_docbin(out_docs, out_path)
    return counts


def noise_file(
    in_path: PathLike,
    out_path: PathLike,
    *,
    method: str = "typed",
    level: str = "medium",
    config: Optional[NoiseConfig] = None,
    seed: int = 0,
    column: str = "NE-COARSE-LIT",
    progress: bool = False,
) -> Dict[str, Any]:
    """Noisy copy of a HIPE ``.tsv`` or a ``.spacy`` DocBin (chosen by extension). Returns a JSON-able report."""
    from .hipe import read_hipe_tsv, write_hipe_tsv

    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.exists():
        raise FileNotFoundError(f"input file not found: {in_path}")
    if in_path.suffix == ".spacy":
        counts = noise_docbin(in_path, out_path, method=method, level=level, config=config, seed=seed, progress=progress)
    else:
        counts = ErrorCounts()
        docs = noise_hipe_docs(
            read_hipe_tsv(in_path), method=method, level=level, config=config, seed=seed, column=column,
            counts=counts, progress=progress,
        )
        write_hipe_tsv(docs, out_path)
    report: Dict[str, Any] = {
        "input": str(in_path),
        "output": str(out_path),
        "method": method,
        "level": level,
        "seed": seed,
        "cer": round(counts.cer, 5),
        "wer": round(counts.wer, 5),
        "chars": counts.chars,
        "words": counts.words,
    }
    if method == "nlpaug":
        report["nlpaug_params"] = dict(NLPAUG_LEVELS[level], aug_word_max=None)
    else:
        report["config"] = (config or NoiseConfig.preset(level)).to_dict()
    return report
