"""Benchmark for ``ocrneurons annotate`` (issue #4).

Generates a synthetic corpus (ALTO v4 files with SP/HYP hyphenation, PAGE files, JSONL
files; a few broken documents), builds a ``spacy.blank("fr")`` + ``entity_ruler`` pipeline,
and runs the real CLI as a subprocess for:

* ``--n-process 1`` and ``--n-process 2`` on the full corpus (default 10,000 documents);
* ``--engine ray`` on a local Ray cluster (if Ray is installed);
* ``--n-process 1`` on the first 1,000 documents, to compare peak memory at 1,000 vs
  10,000 documents (bounded memory: the target is within 10%).

Throughput (documents/s, words/s) comes from the run's ``summary.json`` (steady state: from
the first result on, so pipeline loading and worker start-up are excluded); ``cpu_s`` is the
user+system CPU time of the whole process tree (start-up included); peak memory is the peak RSS of the CLI process tree, sampled
every 50 ms with psutil.

    python bench/bench_archives.py --docs 10000 --small 1000 --workdir /tmp/ocrneurons_bench
"""
import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

FIRST = ["Jean", "Marie", "Pierre", "Louise", "Victor", "Jeanne", "Paul", "Émile", "Camille", "Henri"]
LAST = ["Dupont", "Martin", "Hugo", "Bernard", "Durand", "Lefèvre", "Moreau", "Laurent", "Girard", "Roux"]
PLACES = ["Paris", "Lyon", "Marseille", "Bordeaux", "Lille", "Genève", "Lausanne", "Nantes", "Strasbourg", "Rouen"]
ORGS = ["Banque de France", "Compagnie des Indes", "Société Générale", "Crédit Lyonnais", "Académie française"]
FILLER = (
    "le la les de des du un une et à en dans pour par sur avec que qui ne pas plus son sa ses au aux ce cette "
    "journal séance conseil municipal rapport lettre monsieur madame ville ministre affaire commerce marché "
    "gouvernement nouvelle année prix public article semaine hier matin soir maison rue"
).split()


def _sentence(rng):
    words = []
    for _ in range(rng.randint(8, 18)):
        r = rng.random()
        if r < 0.05:
            words += [rng.choice(FIRST), rng.choice(LAST)]
        elif r < 0.10:
            words.append(rng.choice(PLACES))
        elif r < 0.12:
            words += rng.choice(ORGS).split()
        else:
            words.append(rng.choice(FILLER))
    words[-1] += "."
    return words


def _doc_words(rng, n_words):
    out = []
    while len(out) < n_words:
        out += _sentence(rng)
    return out


def _alto(doc_id, words, rng):
    lines, cur = [], []
    for w in words:
        cur.append(w)
        if len(cur) >= rng.randint(6, 10):
            lines.append(cur)
            cur = []
    if cur:
        lines.append(cur)
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<alto xmlns="http://www.loc.gov/standards/alto/ns-v4#">',
        "<Description><MeasurementUnit>pixel</MeasurementUnit></Description>",
        f'<Layout><Page ID="{doc_id}_p1" HEIGHT="3000" WIDTH="2000"><PrintSpace>',
    ]
    n = 0
    y = 100
    for bi in range(0, len(lines), 8):
        parts.append(f'<TextBlock ID="{doc_id}_b{bi}">')
        for li, line in enumerate(lines[bi:bi + 8]):
            parts.append(f'<TextLine ID="{doc_id}_l{bi + li}" HPOS="100" VPOS="{y}" WIDTH="1800" HEIGHT="40">')
            x = 100
            for wi, w in enumerate(line):
                n += 1
                wc = f"{rng.uniform(0.5, 1.0):.2f}"
                last = wi == len(line) - 1
                if last and len(w) > 6 and rng.random() < 0.3 and li < len(lines[bi:bi + 8]) - 1:
                    # hyphenate: first half here, second half on the next line (SUBS_CONTENT)
                    h = len(w) // 2
                    w1, w2 = w[:h], w[h:]
                    parts.append(f'<String ID="{doc_id}_w{n}" CONTENT="{w1}" SUBS_TYPE="HypPart1" SUBS_CONTENT="{w}" '
                                 f'HPOS="{x}" VPOS="{y}" WIDTH="{12 * len(w1)}" HEIGHT="40" WC="{wc}"/><HYP CONTENT="-"/>')
                    lines[bi + li + 1].insert(0, ("__part2__", w2, w))
                    continue
                if isinstance(w, tuple):
                    _, w2, full = w
                    parts.append(f'<String ID="{doc_id}_w{n}" CONTENT="{w2}" SUBS_TYPE="HypPart2" SUBS_CONTENT="{full}" '
                                 f'HPOS="{x}" VPOS="{y}" WIDTH="{12 * len(w2)}" HEIGHT="40" WC="{wc}"/>')
                    x += 12 * len(w2) + 10
                else:
                    parts.append(f'<String ID="{doc_id}_w{n}" CONTENT="{w}" HPOS="{x}" VPOS="{y}" '
                                 f'WIDTH="{12 * len(w)}" HEIGHT="40" WC="{wc}"/>')
                    x += 12 * len(w) + 10
                if not last:
                    parts.append(f'<SP WIDTH="10" HPOS="{x - 10}" VPOS="{y}"/>')
            parts.append("</TextLine>")
            y += 50
        parts.append("</TextBlock>")
    parts.append("</PrintSpace></Page></Layout></alto>")
    return "\n".join(parts)


def _page(doc_id, words, rng):
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">',
        '<Page imageFilename="x.jpg" imageWidth="2000" imageHeight="3000">',
        f'<TextRegion id="{doc_id}_r1"><Coords points="0,0 2000,0 2000,3000 0,3000"/>',
    ]
    y = 100
    for li in range(0, len(words), 8):
        parts.append(f'<TextLine id="{doc_id}_l{li}"><Coords points="100,{y} 1900,{y} 1900,{y + 40} 100,{y + 40}"/>')
        x = 100
        for wi, w in enumerate(words[li:li + 8]):
            x1 = x + 12 * len(w)
            parts.append(f'<Word id="{doc_id}_w{li + wi}"><Coords points="{x},{y} {x1},{y} {x1},{y + 40} {x},{y + 40}"/>'
                         f'<TextEquiv conf="{rng.uniform(0.5, 1):.2f}"><Unicode>{w}</Unicode></TextEquiv></Word>')
            x = x1 + 10
        parts.append("</TextLine>")
        y += 50
    parts.append("</TextRegion></Page></PcGts>")
    return "\n".join(parts)


def generate_corpus(root: Path, n_docs: int, seed: int = 0):
    """n_docs documents: ~80% ALTO, ~10% PAGE, ~10% JSONL lines (500 per file), 0.5% broken."""
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(seed)
    n_words_total = 0
    jsonl = None
    jsonl_lines = 0
    jsonl_idx = 0
    for i in range(n_docs):
        sub = root / f"box{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        words = _doc_words(rng, rng.randint(60, 300))
        n_words_total += len(words)
        r = rng.random()
        doc_id = f"d{i:06d}"
        if r < 0.005:
            (sub / f"{doc_id}.xml").write_text("<alto><Layout><Page>broken", encoding="utf-8")
        elif r < 0.10:
            (sub / f"{doc_id}.xml").write_text(_page(doc_id, words, rng), encoding="utf-8")
        elif r < 0.20:
            if jsonl is None or jsonl_lines >= 500:
                if jsonl:
                    jsonl.close()
                jsonl = open(root / f"batch{jsonl_idx:03d}.jsonl", "w", encoding="utf-8")
                jsonl_idx += 1
                jsonl_lines = 0
            jsonl.write(json.dumps({"id": doc_id, "text": " ".join(words), "year": 1850 + i % 100}, ensure_ascii=False) + "\n")
            jsonl_lines += 1
        else:
            (sub / f"{doc_id}.xml").write_text(_alto(doc_id, words, rng), encoding="utf-8")
    if jsonl:
        jsonl.close()
    return n_words_total


def make_pipeline(path: Path):
    import spacy

    nlp = spacy.blank("fr")
    ruler = nlp.add_pipe("entity_ruler")
    pats = [{"label": "LOC", "pattern": p} for p in PLACES]
    pats += [{"label": "ORG", "pattern": o} for o in ORGS]
    pats += [{"label": "PER", "pattern": [{"TEXT": f}, {"TEXT": {"IN": LAST}}]} for f in FIRST]
    ruler.add_patterns(pats)
    nlp.to_disk(path)


def _cli_prefix():
    import typer.main
    from spacy_ocrneurons.cli import app

    cmd = typer.main.get_command(app)
    return [sys.executable, "-m", "spacy_ocrneurons"] + (["annotate"] if hasattr(cmd, "commands") else [])


def run_one(name, args, out: Path):
    import psutil

    if out.exists():
        shutil.rmtree(out)
    cmd = _cli_prefix() + args + ["--output", str(out), "--no-progress"]
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            peak_tree = max(peak_tree, rss)
            peak_main = max(peak_main, ps.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    err = proc.stderr.read()
    wall = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{err}")
    s = json.loads((out / "summary.json").read_text())
    row = {
        "run": name,
        "docs": s["documents"],
        "done": s["done"],
        "failed": s["failed"],
        "words": s["words"],
        "docs_per_s": s["docs_per_s"],
        "words_per_s": s["words_per_s"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "docs_per_cpu_s": round(s["documents"] / cpu, 1) if cpu > 0 else None,
        "peak_rss_main_mib": round(peak_main / 2**20, 1),
        "peak_rss_tree_mib": round(peak_tree / 2**20, 1),
        "command": " ".join(["ocrneurons annotate"] + args + ["--output", "OUT", "--no-progress"]),
    }
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--workdir", default="/tmp/ocrneurons_bench")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pipe = work / "ruler_fr"
    make_pipeline(pipe)
    t = time.time()
    big_words = generate_corpus(work / "corpus_big", a.docs)
    small_words = generate_corpus(work / "corpus_small", a.small)
    print(f"corpora generated in {time.time() - t:.1f} s: {a.docs} docs / {big_words} words, "
          f"{a.small} docs / {small_words} words", flush=True)
    rows = []
    common = ["--pipeline", str(pipe), "-t", "jsonl", "--shard-size", "1000", "--batch-size", "64"]
    rows.append(run_one(f"n_process=1, {a.small} docs", [str(work / "corpus_small")] + common + ["--n-process", "1"],
                        work / "out_small"))
    rows.append(run_one(f"n_process=1, {a.docs} docs", [str(work / "corpus_big")] + common + ["--n-process", "1"],
                        work / "out1"))
    rows.append(run_one(f"n_process=2, {a.docs} docs", [str(work / "corpus_big")] + common + ["--n-process", "2"],
                        work / "out2"))
    if not a.no_ray:
        import importlib.util

        if importlib.util.find_spec("ray") is not None:
            rows.append(run_one(f"ray local ({os.cpu_count()} CPUs), {a.docs} docs",
                                [str(work / "corpus_big")] + common + ["--engine", "ray"], work / "out_ray"))
        else:
            print("ray not installed: skipping the Ray run", flush=True)
    # outputs of the engines agree
    import filecmp

    same = all(
        filecmp.cmp(work / "out1" / n, work / o / n, shallow=False)
        for o in ("out2",) + (("out_ray",) if (work / "out_ray").exists() else ())
        for n in os.listdir(work / "out1") if n.startswith("records-")
    )
    mem_small = rows[0]["peak_rss_main_mib"]
    mem_big = rows[1]["peak_rss_main_mib"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}",
        "rows": rows,
        "identical_shards_across_engines": same,
        "peak_memory_ratio_big_vs_small": round(mem_big / mem_small, 3),
    }
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
