"""Benchmark of the ocrneurons_ner component (issue 2). Not a test: prints a Markdown table of ratios.

In one run, on the same texts and the same random-weight model:
  * words/s through ``nlp.pipe`` vs the raw HF forward pass (tokenizer + model on length-sorted padded batches);
  * folded profile vs no profile (target >= 0.99);
  * folded profile vs the original repository's approach: a mask multiplied into ``up_proj``'s output on every
    forward pass (our hook-based ``profile.apply`` does exactly that);
  * peak memory (max RSS) of the process.

Each configuration is timed ``--repeats`` times, interleaved, and the best time is kept.

    python bench/bench_component.py --layers 4 --hidden 256 --docs 200
"""
import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import spacy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spacy_ocrneurons.alignment import label_list  # noqa: E402
from spacy_ocrneurons.base_model import build_token_classifier, train_bpe_tokenizer  # noqa: E402
from spacy_ocrneurons.modeling import load_token_classifier, pack_batches, save_label_map  # noqa: E402
from spacy_ocrneurons.profile import NeutralizationProfile  # noqa: E402

SENTENCES = [
    "M. Théodore Reinach, député radical de la Savoie, a quitté Paris le 12 janvier 1908 pour Lyon.",
    "Le Conseil municipal de Marseille s'est réuni hier sous la présidence de M. Chanot.",
    "On mande de Genève que la Compagnie des chemins de fer du Nord a publié ses recettes.",
    "L'Académie des sciences a reçu une communication de M. Henri Poincaré sur la théorie des marées.",
]


def make_texts(n_docs: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 12))) for _ in range(n_docs)]


def raw_forward(loaded, texts, token_budget):
    tok = loaded.tokenizer
    enc = tok(texts, add_special_tokens=True)["input_ids"]
    out = 0
    with torch.inference_mode():
        for batch in pack_batches([len(e) for e in enc], token_budget):
            rows = [enc[i] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            logits = loaded.model(input_ids=ids, attention_mask=mask).logits
            out += int(logits.argmax(-1).sum())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--arch", default="mistral")
    ap.add_argument("--neurons-per-layer", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4096, help="token budget per forward pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = make_texts(args.docs)
    n_words = sum(len(t.split()) for t in texts)
    tmp = Path(tempfile.mkdtemp())
    tokenizer = train_bpe_tokenizer(SENTENCES * 10, vocab_size=400)
    labels = label_list(["loc", "org", "pers", "prod", "time"])
    model = build_token_classifier(args.arch, tokenizer, labels, seed=0, hidden_size=args.hidden,
                                   num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                                   num_attention_heads=max(1, args.hidden // 64))
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    save_label_map(tmp / "base", labels)
    del model
    profile = NeutralizationProfile(
        neurons={l: list(range(0, args.intermediate, max(1, args.intermediate // args.neurons_per_layer)))[: args.neurons_per_layer]
                 for l in range(args.layers)},
        factor=0.5, model={"num_hidden_layers": args.layers, "intermediate_size": args.intermediate},
    )
    profile.save(tmp / "profile.json")

    def pipeline(with_profile):
        nlp = spacy.blank("fr")
        nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp / "base"), "batch_size": args.batch_size,
                                               "profile": str(tmp / "profile.json") if with_profile else None})
        nlp.get_pipe("ocrneurons_ner").loaded  # load outside the timing
        return nlp

    nlp_plain, nlp_folded = pipeline(False), pipeline(True)
    raw_model = load_token_classifier(tmp / "base")
    masked_model = load_token_classifier(tmp / "base")

    def run_pipe(nlp):
        return sum(len(d.ents) for d in nlp.pipe(texts, batch_size=256))

    def run_masked():
        with profile.apply(masked_model.model):
            return raw_forward(masked_model, texts, args.batch_size)

    runs = {
        "raw HF forward (no profile)": lambda: raw_forward(raw_model, texts, args.batch_size),
        "nlp.pipe, no profile": lambda: run_pipe(nlp_plain),
        "nlp.pipe, folded profile": lambda: run_pipe(nlp_folded),
        "raw HF forward, mask on up_proj output (original repo's approach)": run_masked,
        "raw HF forward, folded profile": lambda: raw_forward(nlp_folded.get_pipe("ocrneurons_ner").loaded, texts, args.batch_size),
    }
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    wps = {k: n_words / v for k, v in best.items()}
    ratios = {
        "nlp.pipe / raw forward (target >= 0.95)": wps["nlp.pipe, no profile"] / wps["raw HF forward (no profile)"],
        "folded profile / no profile, nlp.pipe (target >= 0.99)": wps["nlp.pipe, folded profile"] / wps["nlp.pipe, no profile"],
        "folded / per-forward mask, raw forward": wps["raw HF forward, folded profile"]
        / wps["raw HF forward, mask on up_proj output (original repo's approach)"],
    }
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"docs={len(texts)} words={n_words} arch={args.arch} layers={args.layers} hidden={args.hidden} "
          f"intermediate={args.intermediate} threads={torch.get_num_threads()} repeats={args.repeats}\n")
    print("| configuration | best time (s) | words/s |\n|---|---|---|")
    for k in runs:
        print(f"| {k} | {best[k]:.3f} | {wps[k]:.0f} |")
    print("\n| ratio | value |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |")
    print(f"\npeak RSS: {peak_mib:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"words_per_s": wps, "ratios": ratios, "peak_rss_mib": peak_mib}, indent=2))


if __name__ == "__main__":
    main()
