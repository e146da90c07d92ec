"""The embedded default dataset: synthetic French historical-newspaper sentences in HIPE TSV.

Everything here is written by us (templates and small name lists), so the files under ``assets/sample/`` can be
committed and used by the demo workflow without the licensed HIPE data. The generator is deterministic:
:func:`write_sample` with the default seeds reproduces the committed files byte for byte.

Coarse types: ``pers``, ``loc``, ``org``, ``time``, ``prod`` (as in HIPE-2020); fine types ``pers.ind``,
``loc.adm.town``, ``loc.adm.reg``, ``loc.adm.nat``, ``org.adm``, ``org.ent``, ``time.date.abs``, ``prod.media``.
Tokenisation follows HIPE: punctuation, elided articles (``l'``), hyphens and the dot of ``M.`` are tokens of their
own, with ``NoSpaceAfter`` where the text has no space; ``EndOfSentence`` ends each sentence and ``EndOfLine``
simulates newspaper columns of about 40 characters.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .hipe import HIPE_COLUMNS, HipeDocument, HipeToken, format_hipe_tsv

PathLike = Union[str, Path]

#: split -> (seed, number of sentences)
SPLITS: Dict[str, Tuple[int, int]] = {"train": (1908, 300), "dev": (1909, 80), "test": (1910, 80)}
SENTENCES_PER_DOC = 10
GENERATOR_VERSION = "1"

# ---- name lists (entities carry their own article where French needs one) ------------------------------

FIRST_NAMES = [
    "Théodore", "Jules", "Émile", "Louis", "Henri", "Paul", "Georges", "Édouard", "Joseph", "Charles", "Eugène",
    "Gaston", "Léon", "Marcel", "Auguste", "Félix", "Victor", "Ernest", "Maurice", "Albert",
]
FEMALE_FIRST_NAMES = ["Marie", "Louise", "Jeanne", "Marguerite", "Berthe", "Camille", "Hélène", "Juliette"]
SURNAMES = [
    "Dupont", "Lefèvre", "Marchand", "Girard", "Rousseau", "Fontaine", "Chevalier", "Morel", "Bonnet", "Lambert",
    "Garnier", "Faure", "Mercier", "Blanchard", "Guérin", "Boyer", "Roussel", "Perrin", "Clément", "Gautier",
    "Delacroix", "Baudry", "Vasseur", "Thibault", "de Montcalm", "Le Goff", "Duval", "Lemaître",
]
TITLES = ["M.", "M.", "M.", "Mme", "le docteur", "le général", "le colonel", "Mgr", "maître", "l'abbé"]
FUNCTIONS = [
    "député", "sénateur", "maire", "préfet", "conseiller général", "ancien ministre", "négociant", "avocat",
    "ingénieur", "professeur",
]
CITIES = [
    "Paris", "Lyon", "Marseille", "Bordeaux", "Lille", "Rouen", "Nancy", "Toulouse", "Nantes", "Grenoble",
    "Chambéry", "Saint-Étienne", "Besançon", "Genève", "Lausanne", "Berlin", "Londres", "Bruxelles", "Rome",
    "Alger", "Orléans", "Dijon", "Reims", "Le Havre", "Versailles", "Neuchâtel", "Fribourg", "Strasbourg",
]
# (article, name)
REGIONS = [
    ("la", "Savoie"), ("la", "Bretagne"), ("la", "Normandie"), ("l'", "Isère"), ("la", "Gironde"),
    ("le", "Jura"), ("l'", "Alsace"), ("la", "Lorraine"), ("le", "Var"), ("la", "Haute-Savoie"), ("l'", "Aisne"),
    ("le", "Valais"), ("le", "canton de Vaud"),
]
# (article, name, preposition of place)
COUNTRIES = [
    ("la", "France", "en"), ("l'", "Allemagne", "en"), ("l'", "Angleterre", "en"), ("la", "Russie", "en"),
    ("l'", "Italie", "en"), ("l'", "Espagne", "en"), ("la", "Suisse", "en"), ("le", "Maroc", "au"),
    ("la", "Belgique", "en"), ("l'", "Autriche", "en"), ("le", "Japon", "au"), ("les", "États-Unis", "aux"),
]
# (article, name, fine type)
ORGS = [
    ("la", "Chambre des députés", "org.adm"), ("le", "Sénat", "org.adm"), ("le", "Conseil municipal", "org.adm"),
    ("l'", "Académie française", "org.ent"), ("la", "Banque de France", "org.ent"),
    ("la", "Compagnie des chemins de fer de l'Est", "org.ent"), ("le", "Crédit lyonnais", "org.ent"),
    ("la", "Société générale", "org.ent"), ("le", "Conseil fédéral", "org.adm"), ("la", "Croix-Rouge", "org.ent"),
    ("le", "Conseil d'État", "org.adm"), ("la", "Société des gens de lettres", "org.ent"),
    ("le", "Comité des forges", "org.ent"), ("l'", "Union des syndicats", "org.ent"),
]
NEWSPAPERS = [
    "Le Temps", "Le Figaro", "Le Petit Journal", "Le Matin", "Le Gaulois", "L'Écho de Paris", "La Croix",
    "Le Journal des Débats", "La Gazette de Lausanne", "L'Intransigeant", "Le Petit Parisien", "La Lanterne",
]
MONTHS = [
    "janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre", "novembre",
    "décembre",
]

# ---- templates: {SLOT} or {prep:SLOT}; text outside slots is never an entity -----------------------------

TEMPLATES = [
    "{PERS}, {FUNC} {de:REGION}, a quitté {CITY} {DATE} pour {CITY}.",
    "On annonce la mort de {PERS}, ancien maire {de:CITY}.",
    "{le:ORG} a tenu séance hier sous la présidence de {PERS}.",
    "{PROD} publie ce matin une lettre de {PERS} sur les affaires {de:COUNTRY}.",
    "Une dépêche {de:CITY} annonce que {PERS} est arrivé {à:CITY}.",
    "{DATE_CAP}, {le:ORG} a voté le projet de loi relatif aux chemins de fer.",
    "Le conseil de révision siégera {à:CITY} {DATE}.",
    "{PERS} a été nommé préfet {de:REGION}.",
    "Nous lisons dans {PROD} : {PERS} partira demain pour {CITY}.",
    "{le:ORG} a ouvert une souscription en faveur des inondés {de:REGION}.",
    "{PERS} a fait un long séjour {en:COUNTRY} afin d'y étudier les écoles.",
    "Le tribunal correctionnel {de:CITY} a condamné le nommé {NAME} à trois mois de prison.",
    "Les obsèques de {PERS} auront lieu {DATE} {à:CITY}.",
    "Le président de la République a signé {DATE} le décret nommant {PERS} ambassadeur {à:CITY}.",
    "On mande {de:CITY} que la grève des mineurs continue.",
    "Selon {PROD}, {le:ORG} prépare un nouvel emprunt.",
    "Le roi des Belges est arrivé hier soir {à:CITY}, où il a été reçu par {PERS}.",
    "Un violent incendie a détruit {DATE} une filature {de:CITY}.",
    "{PERS}, {FUNC}, vient de publier une brochure sur la question {de:COUNTRY}.",
    "La conférence de {NAME} sur {CITY} a obtenu un vif succès.",
    "Les relations entre {la:COUNTRY} et {la:COUNTRY} demeurent excellentes.",
    "{le:ORG} a décidé de convoquer les électeurs {de:REGION} {DATE}.",
    "Le train express venant {de:CITY} a déraillé près {de:CITY}.",
    "{PERS} et {PERS} ont été reçus par {le:ORG}.",
    "La session du conseil général {de:REGION} s'ouvrira {DATE}.",
    "On signale {de:CITY} un froid très vif ; la Seine charrie des glaçons.",
    "Le correspondant {de:PROD} à {CITY} nous écrit que {PERS} est gravement malade.",
    "{PROD} assure que {PERS} accepterait le portefeuille des finances.",
    "Depuis {YEAR}, la population {de:CITY} a doublé.",
    "La souscription ouverte par {PROD} atteint aujourd'hui quarante mille francs.",
]

_SLOT_RE = re.compile(r"\{(?:(\w+):)?([A-Z_]+)\}")
_PUNCT_ATTACH = {",", ".", ")"}  # no space before these
_ELISIONS = ("l'", "d'", "qu'", "s'", "n'", "j'", "L'", "D'", "Qu'", "S'", "N'")


def _contract(prep: str, article: str) -> List[str]:
    """French preposition + article: de + le = du, à + les = aux, de + l' = de l'."""
    table = {("de", "le"): ["du"], ("de", "les"): ["des"], ("à", "le"): ["au"], ("à", "les"): ["aux"]}
    if (prep, article) in table:
        return table[(prep, article)]
    return [prep, article] if article else [prep]


class _SentenceBuilder:
    """Collects (surface text, coarse label, fine label) pieces of one sentence."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pieces: List[Tuple[str, Optional[str], Optional[str]]] = []

    def text(self, s: str) -> None:
        if s.strip():
            self.pieces.append((s.strip(), None, None))

    def ent(self, prefix_words: Sequence[str], s: str, label: str, fine: str) -> None:
        if prefix_words:
            self.text(" ".join(prefix_words))
        self.pieces.append((s, label, fine))

    def slot(self, prep: Optional[str], name: str, sentence_start: bool) -> None:
        rng = self.rng
        if name == "PERS":
            title = rng.choice(TITLES)
            names = FEMALE_FIRST_NAMES if title == "Mme" else FIRST_NAMES
            first = rng.choice(names) + " " if rng.random() < 0.6 else ""
            if title.startswith(("le ", "l'")):
                art, _, rest = title.partition(" ") if title.startswith("le ") else ("l'", "", title[2:])
                if sentence_start:
                    art = art[0].upper() + art[1:]
                self.ent([art], f"{rest} {first}{rng.choice(SURNAMES)}", "pers", "pers.ind")
            else:
                self.ent([], f"{title} {first}{rng.choice(SURNAMES)}", "pers", "pers.ind")
        elif name == "NAME":
            first = rng.choice(FIRST_NAMES + FEMALE_FIRST_NAMES)
            self.ent([], f"{first} {rng.choice(SURNAMES)}", "pers", "pers.ind")
        elif name == "FUNC":
            self.text(rng.choice(FUNCTIONS))
        elif name == "CITY":
            city = rng.choice(CITIES)
            if city.startswith("Le ") and prep in ("de", "à"):  # du Havre, au Havre
                self.ent(_contract(prep, "le"), city[3:], "loc", "loc.adm.town")
            else:
                self.ent([prep] if prep else [], city, "loc", "loc.adm.town")
        elif name == "REGION":
            art, reg = rng.choice(REGIONS)
            self.ent(_contract(prep, art) if prep else [art], reg, "loc", "loc.adm.reg")
        elif name == "COUNTRY":
            art, country, place = rng.choice(COUNTRIES)
            if prep == "en":
                self.ent([place], country, "loc", "loc.adm.nat")
            elif prep == "la":
                self.ent([art], country, "loc", "loc.adm.nat")
            else:
                self.ent(_contract(prep, art) if prep else [art], country, "loc", "loc.adm.nat")
        elif name == "ORG":
            art, org, fine = rng.choice(ORGS)
            if prep == "le":
                words = [art[0].upper() + art[1:]] if sentence_start else [art]
            else:
                words = _contract(prep, art) if prep else [art]
            self.ent(words, org, "org", fine)
        elif name == "PROD":
            paper = rng.choice(NEWSPAPERS)
            if prep == "de":  # "du Temps": the article merges with the preposition
                art, _, rest = paper.partition(" ")
                art = art.lower()
                if art.endswith("'"):
                    self.ent(["de"], paper, "prod", "prod.media")
                else:
                    self.ent(_contract("de", art), rest, "prod", "prod.media")
            else:
                self.ent([], paper, "prod", "prod.media")
        elif name in ("DATE", "DATE_CAP"):
            day = rng.randint(1, 28)
            day_s = "1er" if day == 1 else str(day)
            date = f"{day_s} {rng.choice(MONTHS)}"
            if rng.random() < 0.5:
                date += f" {rng.randint(1880, 1914)}"
            self.ent([], ("Le " if name == "DATE_CAP" else "le ") + date, "time", "time.date.abs")
        elif name == "YEAR":
            self.ent([], str(rng.randint(1870, 1905)), "time", "time.date.abs")
        else:  # pragma: no cover - template typo
            raise ValueError(f"unknown slot {name!r}")


def _tokenize(text: str) -> List[Tuple[str, bool]]:
    """HIPE-like tokens: (token, no_space_after). Punctuation, elided articles and hyphens are split off."""
    out: List[Tuple[str, bool]] = []
    for chunk in text.split():
        rest, trailing = chunk, []
        while len(rest) > 1 and rest[-1] in ",.;:!?)":
            trailing.insert(0, rest[-1])
            rest = rest[:-1]
        parts: List[str] = []
        for el in _ELISIONS:
            if rest.startswith(el) and len(rest) > len(el):
                parts.append(el)
                rest = rest[len(el) :]
                break
        parts.extend(p for p in re.split(r"(-)", rest) if p)
        parts.extend(trailing)
        for k, p in enumerate(parts):
            out.append((p, k < len(parts) - 1))
    return out


_CONTRACTIONS = {("de", "le"): "du", ("de", "les"): "des", ("à", "le"): "au", ("à", "les"): "aux"}
_ELIDE = {"de": "d'", "que": "qu'", "le": "l'", "la": "l'"}
_VOWELS = tuple("aeiouéèêàâîôûAEIOUÉÈÊÀÂÎÔÛ")


def _french_orthography(tokens: List[Tuple[str, str, str, bool]]) -> List[Tuple[str, str, str, bool]]:
    """de + le -> du (outside entities), de + vowel -> d', and no space after an elided word."""
    out: List[Tuple[str, str, str, bool]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt and tok[1] == "O" and nxt[1] == "O" and (tok[0], nxt[0]) in _CONTRACTIONS:
            out.append((_CONTRACTIONS[(tok[0], nxt[0])],) + nxt[1:])
            i += 2
            continue
        if nxt and tok[0] in _ELIDE and nxt[0].startswith(_VOWELS) and not tok[3]:
            tok = (_ELIDE[tok[0]],) + tok[1:]
        if tok[0].endswith("'"):
            tok = tok[:3] + (True,)
        out.append(tok)
        i += 1
    return out


def generate_sentence(rng: random.Random) -> List[Tuple[str, str, str, bool]]:
    """One synthetic sentence as (token, coarse IOB tag, fine IOB tag, no_space_after)."""
    template = rng.choice(TEMPLATES)
    builder = _SentenceBuilder(rng)
    pos = 0
    for m in _SLOT_RE.finditer(template):
        builder.text(template[pos : m.start()])
        builder.slot(m.group(1), m.group(2), sentence_start=m.start() == 0)
        pos = m.end()
    builder.text(template[pos:])
    tokens: List[Tuple[str, str, str, bool]] = []
    for text, label, fine in builder.pieces:
        toks = _tokenize(text)
        for k, (tok, nsa) in enumerate(toks):
            if label is None:
                tokens.append((tok, "O", "O", nsa))
            else:
                pre = "B-" if k == 0 else "I-"
                tokens.append((tok, pre + label, pre + fine, nsa))
    tokens = _french_orthography(tokens)
    # punctuation that attaches to the previous token (also across pieces): no space before it
    fixed: List[Tuple[str, str, str, bool]] = []
    for tok in tokens:
        if tok[0] in _PUNCT_ATTACH and fixed:
            fixed[-1] = fixed[-1][:3] + (True,)
        fixed.append(tok)
    # capitalise the first letter of the sentence
    first = fixed[0]
    fixed[0] = (first[0][0].upper() + first[0][1:],) + first[1:]
    return fixed


def generate_documents(split: str, seed: Optional[int] = None, n_sentences: Optional[int] = None) -> List[HipeDocument]:
    """Synthetic HIPE documents for ``split`` (``train``, ``dev``, ``test``), deterministic for a given seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    default_seed, default_n = SPLITS[split]
    seed = default_seed if seed is None else seed
    n_sentences = default_n if n_sentences is None else n_sentences
    rng = random.Random(seed)
    docs: List[HipeDocument] = []
    n_docs = (n_sentences + SENTENCES_PER_DOC - 1) // SENTENCES_PER_DOC
    for d in range(n_docs):
        year, month, day = rng.randint(1880, 1914), rng.randint(1, 12), rng.randint(1, 28)
        paper = rng.choice(["EXP", "GDL", "JDG", "LCE"])
        doc_id = f"sample-{split}-{paper}-{year}-{month:02d}-{day:02d}-{d + 1:03d}"
        comments = [
            f"# hipe2022:document_id = {doc_id}",
            f"# hipe2022:date = {year}-{month:02d}-{day:02d}",
            "# hipe2022:language = fr",
            "# hipe2022:document_type = newspaper",
            "# hipe2022:dataset = sample",
            f"# hipe2022:original_source = spacy_ocrneurons.sample_data v{GENERATOR_VERSION} (seed {seed})",
            "# hipe2022:applicable_columns = " + " ".join(HIPE_COLUMNS),
            "# sample:license = MIT (synthetic text written for spacy-ocrneurons; not real newspaper data)",
        ]
        tokens: List[HipeToken] = []
        line_len = 0
        line_max = rng.randint(32, 48)
        for _ in range(min(SENTENCES_PER_DOC, n_sentences - d * SENTENCES_PER_DOC)):
            sent = generate_sentence(rng)
            for k, (tok, coarse, fine, nsa) in enumerate(sent):
                flags = []
                if nsa and k < len(sent) - 1:
                    flags.append("NoSpaceAfter")
                line_len += len(tok) + (0 if nsa else 1)
                if line_len >= line_max and not (k + 1 < len(sent) and sent[k + 1][0] in _PUNCT_ATTACH):
                    flags.append("EndOfLine")
                    line_len = 0
                    line_max = rng.randint(32, 48)
                if k == len(sent) - 1:
                    flags.append("EndOfSentence")
                ent = coarse != "O"
                values = {
                    "NE-COARSE-LIT": coarse,
                    "NE-COARSE-METO": "O",
                    "NE-FINE-LIT": fine,
                    "NE-FINE-METO": "O",
                    "NE-FINE-COMP": "O",
                    "NE-NESTED": "O",
                    "NEL-LIT": "NIL" if ent else "_",
                    "NEL-METO": "_",
                    "MISC": "|".join(flags) if flags else "_",
                }
                tokens.append(HipeToken(tok, values))
        docs.append(HipeDocument(tokens=tokens, comments=comments, columns=HIPE_COLUMNS))
    return docs


def sample_dir() -> Path:
    """The committed ``assets/sample`` folder of the source tree."""
    return Path(__file__).resolve().parent.parent / "assets" / "sample"


def sample_path(split: str, directory: Optional[PathLike] = None) -> Path:
    """Path of ``sample-{split}-fr.tsv`` in ``directory`` (default: :func:`sample_dir`)."""
    return Path(directory or sample_dir()) / f"sample-{split}-fr.tsv"


def write_sample(output: PathLike = "assets/sample", splits: Sequence[str] = tuple(SPLITS)) -> List[Path]:
    """Generate the sample splits with their default seeds and write ``sample-{split}-fr.tsv`` files."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in splits:
        path = sample_path(split, output)
        path.write_bytes(format_hipe_tsv(generate_documents(split)).encode("utf-8"))
        paths.append(path)
    return paths


def load_sample(split: str) -> List[HipeDocument]:
    """The sample split as HIPE documents (read from ``assets/sample`` when present, else generated)."""
    from .hipe import read_hipe_tsv

    path = sample_path(split)
    return read_hipe_tsv(path) if path.is_file() else generate_documents(split)
