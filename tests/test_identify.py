"""Tests for neuron identification: pairs, activation capture, streaming statistics, CKA, profiles, plots, CLI."""
import json

import numpy as np
import pytest
import torch

from spacy_ocrneurons.architectures import model_shape, site_module
from spacy_ocrneurons.base_model import build_token_classifier, train_bpe_tokenizer
from spacy_ocrneurons.identify import (
    STATISTICS,
    NeuronStats,
    SentencePair,
    StreamingCKA,
    altered_words,
    collect_pair_activations,
    identify,
    load_pairs,
    parse_k,
    parse_layers,
    resolve_k,
    save_pairs,
    sentence_text,
)
from spacy_ocrneurons.modeling import LoadedModel
from spacy_ocrneurons.profile import NeutralizationProfile

TEXTS = [
    "Le président de la République est arrivé à Paris hier soir .",
    "La ville de Lyon accueille le congrès des médecins .",
    "Monsieur Dupont habite rue de Rivoli , près du Louvre .",
    "Le journal annonce la mort du général Boulanger à Bruxelles .",
] * 4
LABELS = ["O", "B-loc", "I-loc", "B-pers", "I-pers"]
WIDTH = 48


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=220)


@pytest.fixture(scope="module")
def loaded(tokenizer):
    model = build_token_classifier("llama", tokenizer, LABELS, seed=0, hidden_size=32, intermediate_size=WIDTH,
                                   num_hidden_layers=3, num_attention_heads=2)
    return LoadedModel(model=model, tokenizer=tokenizer, labels=LABELS, device=torch.device("cpu"),
                       dtype=torch.float32)


def _pair(clean, noisy, alignment):
    cw, nw = clean.split(), noisy.split()
    return SentencePair(cw, [True] * len(cw), nw, [True] * len(nw), alignment)


def _identity(n):
    return [[i] for i in range(n)]


@pytest.fixture(scope="module")
def pairs():
    return [
        _pair("Le président est arrivé à Paris hier .", "Le présidcnt est arrivé à Pari s hier .",
              [[0], [1], [2], [3], [4], [5], [5], [6], [7]]),
        _pair("La ville de Lyon accueille le congrès .", "La vi1le de Lyon accuei lle le congrés .",
              _identity(4) + [[4], [4], [5], [6], [7]]),
        _pair("Monsieur Dupont habite rue de Rivoli .", "Monsieur Dnpont habite rue deRivoli .",
              [[0], [1], [2], [3], [4, 5], [6]]),
        _pair("Le journal annonce la mort du général Boulanger .", "Le jourual annonce la mort du généraI Bou1anger .",
              _identity(9)),
    ]


# ------------------------------------------------------------------------------------------- pairs


def test_altered_words_groups_splits_and_merges(pairs):
    words = altered_words(pairs[0])
    assert [(w.clean_tokens, w.noisy_tokens, w.clean_text, w.noisy_text) for w in words] == [
        ((1,), (1,), "président", "présidcnt"), ((5,), (5, 6), "Paris", "Pari s")]
    merged = altered_words(pairs[2])
    assert [(w.clean_tokens, w.noisy_tokens) for w in merged] == [((1,), (1,)), ((4, 5), (4,))]
    same = _pair("Le chat dort .", "Le chat dort .", _identity(4))
    assert altered_words(same) == []
    inserted = _pair("Le chat dort .", "Le chat x dort .", [[0], [1], [], [2], [3]])
    assert altered_words(inserted) == []  # an inserted token has no clean counterpart


def test_sentence_pair_checks_alignment():
    with pytest.raises(ValueError, match="clean token 9"):
        _pair("a b", "a c", [[0], [9]])
    with pytest.raises(ValueError, match="alignment has 1 entries"):
        _pair("a b", "a c", [[0]])


def test_pairs_file_round_trip(tmp_path, pairs):
    path = save_pairs(pairs, tmp_path / "pairs.jsonl")
    back = load_pairs(path)
    assert [p.to_dict() for p in back] == [p.to_dict() for p in pairs]


def test_parse_layers_and_k():
    assert parse_layers("0-2,5", 8) == [0, 1, 2, 5]
    assert parse_layers(None, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="Layer 8 in .7-9. does not exist"):
        parse_layers("7-9", 8)
    assert parse_k("5,10,1%,0.5") == [5, 10, 0.01, 0.5]
    assert [resolve_k(k, 200) for k in parse_k("5,1%,0.5,500")] == [5, 2, 100, 200]
    with pytest.raises(ValueError):
        parse_k("0")


# ------------------------------------------------------------------------------------ statistics


def _brute_force(clean, noisy, z):
    d = clean - noisy
    absd = np.abs(d)
    n = len(d)
    thr = absd.mean(1, keepdims=True) + z * absd.std(1, keepdims=True)
    mean = d.mean(0)
    var = d.var(0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_stat = np.abs(mean) / np.sqrt(var / n)
    return {
        "mean_diff": mean,
        "var_diff": var,
        "mean_abs_diff": absd.mean(0),
        "abs_mean_diff": np.abs(mean),
        "t_stat": t_stat,
        "outlier_rate": (absd > thr).mean(0),
        "rate_clean": (clean > 0).mean(0),
        "rate_noisy": (noisy > 0).mean(0),
        "activation_rate_diff": np.abs((clean > 0).mean(0) - (noisy > 0).mean(0)),
        "flip_rate": ((clean > 0) != (noisy > 0)).mean(0),
        "mean_clean": clean.mean(0),
        "mean_noisy": noisy.mean(0),
    }


def test_streaming_stats_match_brute_force_and_memory_is_fixed():
    rng = np.random.default_rng(0)
    width = 40
    stats = NeuronStats(width, [0, 3], z=1.5)
    size = stats.nbytes
    store = {0: ([], []), 3: ([], [])}
    for b in (1, 7, 30, 2, 61):
        for layer, shift in ((0, 0.0), (3, 5.0)):
            c = rng.normal(shift, 1.0 + np.arange(width) / 10, size=(b, width))
            n = c + rng.normal(0.3, 0.5, size=(b, width)) * (np.arange(width) % 3)
            stats.update(layer, c, n)
            store[layer][0].append(c)
            store[layer][1].append(n)
    assert stats.nbytes == size  # accumulators do not grow with the number of pairs
    for layer in (0, 3):
        clean, noisy = np.concatenate(store[layer][0]), np.concatenate(store[layer][1])
        assert stats.n[layer] == len(clean) == 101
        expected = _brute_force(clean, noisy, 1.5)
        for name, want in expected.items():
            got = stats.statistic(layer, name)
            finite = np.isfinite(want)
            np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6, err_msg=name)
            assert np.all(np.isinf(got[~finite]) | (got[~finite] == 0))
        assert set(STATISTICS) <= set(expected)
        order = stats.rank(layer, "mean_abs_diff")
        assert list(order[:5]) == list(np.argsort(-expected["mean_abs_diff"], kind="stable")[:5])
    # neurons 0, 3, 6, ... get no noise: they must rank last on mean |d|
    assert set(stats.rank(0)[-(width // 3 + 1):]) == set(range(0, width, 3))


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    stats = NeuronStats(10, [1, 2])
    for layer in (1, 2):
        stats.update(layer, rng.normal(size=(9, 10)), rng.normal(size=(9, 10)))
    back = NeuronStats.load(stats.save(tmp_path / "s.npz", prefix="context__"), prefix="context__")
    for layer in (1, 2):
        for name in STATISTICS:
            np.testing.assert_array_equal(back.statistic(layer, name), stats.statistic(layer, name))
    with pytest.raises(ValueError, match=r"shape \(n, 10\)"):
        stats.update(1, np.zeros((2, 9)), np.zeros((2, 9)))


def _direct_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    hsic = np.sum((x @ x.T) * (y @ y.T))  # kernel (Gram) form, independent of the feature-space formula
    return hsic / np.sqrt(np.sum((x @ x.T) ** 2) * np.sum((y @ y.T) ** 2))


def test_streaming_cka_matches_direct_and_invariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 12)) + 3.0
    y = 0.6 * x @ rng.normal(size=(12, 12)) + rng.normal(size=(80, 12))
    cka = StreamingCKA(12, [0, 1, 2], max_dim=None)
    for a in range(0, 80, 13):
        cka.update(0, x[a:a + 13], y[a:a + 13])
        cka.update(1, x[a:a + 13], x[a:a + 13])
        cka.update(2, x[a:a + 13], 7.5 * y[a:a + 13] - 2.0)
    want = _direct_cka(x, y)
    assert 0.05 < want < 0.95
    assert abs(cka.cka(0) - want) < 1e-6
    assert abs(cka.cka(1) - 1.0) < 1e-9
    assert abs(cka.cka(2) - want) < 1e-6  # invariant to isotropic scaling and translation
    assert cka.describe()["method"] == "all"


@pytest.mark.parametrize("method", ["subsample", "projection"])
def test_streaming_cka_reduced_dimension(method):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 30))
    y = x + rng.normal(size=(50, 30))
    cka = StreamingCKA(30, [0], max_dim=8, method=method, seed=4)
    cka.update(0, x[:20], y[:20])
    cka.update(0, x[20:], y[20:])
    if method == "subsample":
        assert len(set(cka.index.tolist())) == 8
        want = _direct_cka(x[:, cka.index], y[:, cka.index])
    else:
        want = _direct_cka(x @ cka.projection, y @ cka.projection)
    assert abs(cka.cka(0) - want) < 1e-6
    info = cka.describe()
    assert info["method"] == method and info["dim"] == 8 and info["seed"] == 4
    assert cka.sxx[0].shape == (8, 8)


# ----------------------------------------------------------------------------------- activations


def _manual_word_vector(loaded, text, spans, layer, site="mlp.up_proj"):
    """BOS + the text's pieces, no batching; mean site output over pieces overlapping ``spans``."""
    tok = loaded.tokenizer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = []
    for p, (s, e) in enumerate(enc["offset_mapping"]):
        while s < e and text[s].isspace():
            s += 1
        if e > s and any(s < te and e > ts for ts, te in spans):
            pieces.append(p + 1)  # +1: BOS
    captured = {}
    handle = site_module(loaded.model, layer, site).register_forward_hook(
        lambda m, i, o: captured.__setitem__("out", o.detach()))
    try:
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([[tok.bos_token_id] + enc["input_ids"]]))
    finally:
        handle.remove()
    return captured["out"][0, pieces].mean(0).numpy()


@pytest.mark.parametrize("site", ["mlp.up_proj", "mlp.gate_proj"])
def test_context_activations_equal_manual_forward(loaded, pairs, site):
    pair = pairs[0]
    (batch,) = list(collect_pair_activations(loaded, [pair], site=site, mode="context", layers=[0, 2]))
    assert len(batch.words) == 2 and batch.skipped == 0
    ctext, cspans = sentence_text(pair.clean_words, pair.clean_spaces)
    ntext, nspans = sentence_text(pair.noisy_words, pair.noisy_spaces)
    for layer in (0, 2):
        clean, noisy = batch.activations[layer]
        assert clean.shape == noisy.shape == (2, WIDTH)
        for row, word in enumerate(batch.words):
            want_c = _manual_word_vector(loaded, ctext, [cspans[j] for j in word.clean_tokens], layer, site)
            want_n = _manual_word_vector(loaded, ntext, [nspans[j] for j in word.noisy_tokens], layer, site)
            np.testing.assert_allclose(clean[row], want_c, atol=1e-5)
            np.testing.assert_allclose(noisy[row], want_n, atol=1e-5)


def test_isolated_activations_equal_manual_forward(loaded, pairs):
    (batch,) = list(collect_pair_activations(loaded, pairs[:1], mode="isolated", layers=[1]))
    clean, noisy = batch.activations[1]
    np.testing.assert_allclose(clean[1], _manual_word_vector(loaded, "Paris", [(0, 5)], 1), atol=1e-5)
    np.testing.assert_allclose(noisy[1], _manual_word_vector(loaded, "Pari s", [(0, 4), (5, 6)], 1), atol=1e-5)
    (ctx,) = list(collect_pair_activations(loaded, pairs[:1], mode="context", layers=[1]))
    assert not np.allclose(ctx.activations[1][0][1], clean[1], atol=1e-4)  # context changes the vector


@pytest.mark.parametrize("mode,bidirectional", [("context", False), ("isolated", False), ("context", True)])
def test_padding_is_never_gathered(loaded, pairs, mode, bidirectional):
    if bidirectional:  # padding would change every position if the attention mask were not applied
        loaded = LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer, labels=LABELS, bidirectional=True,
                             device=torch.device("cpu"))
    long = _pair(" ".join(TEXTS[:3]), " ".join(TEXTS[:3]).replace("Paris", "Pnris").replace("Lyon", "Lyou"),
                 _identity(len(" ".join(TEXTS[:3]).split())))
    (alone,) = list(collect_pair_activations(loaded, [pairs[1]], mode=mode))
    (together,) = list(collect_pair_activations(loaded, [long, pairs[1]], mode=mode, batch_size=100000))
    n_long = len(altered_words(long))
    assert n_long >= 2 and len(together.words) == n_long + len(alone.words)
    for layer in (0, 1, 2):
        for side in (0, 1):
            np.testing.assert_allclose(together.activations[layer][side][n_long:], alone.activations[layer][side],
                                       atol=1e-5)


def test_windows_cover_long_sentences(loaded, pairs):
    (full,) = list(collect_pair_activations(loaded, [pairs[3]], mode="context", layers=[0]))
    (win,) = list(collect_pair_activations(loaded, [pairs[3]], mode="context", layers=[0], max_length=8, stride=2))
    assert win.skipped == 0 and len(win.words) == len(full.words) == 3
    # the first altered word ("journal") lies in the first window: same left context, same vector
    np.testing.assert_allclose(win.activations[0][0][0], full.activations[0][0][0], atol=1e-5)


# ------------------------------------------------------------------------------------ identify


def test_identify_writes_profiles_stats_metrics_and_plots(tmp_path, loaded, pairs):
    summary = identify(loaded, pairs, "3,0.25", layers=[0, 2], profiles_dir=tmp_path / "profiles",
                       metrics_path=tmp_path / "metrics" / "identify.json", plots_dir=tmp_path / "plots",
                       stats_path=tmp_path / "stats.npz", cka_max_dim=16, seed=7, name="tiny",
                       provenance={"data": "unit-test", "noise": "hand-made"}, progress=False, chunk_words=3)
    n_words = sum(len(altered_words(p)) for p in pairs)
    assert summary["n_pairs"] == {"context": n_words, "isolated": n_words}

    # brute force over stored activations (same pipeline, all chunks at once)
    stats = summary["_stats"]["context"]
    batches = list(collect_pair_activations(loaded, pairs, mode="context", layers=[0, 2], chunk_words=1000))
    for layer in (0, 2):
        clean, noisy = (np.concatenate([b.activations[layer][s] for b in batches]).astype(np.float64) for s in (0, 1))
        want = _brute_force(clean, noisy, 2.0)
        for name in ("mean_abs_diff", "mean_diff", "outlier_rate", "rate_clean", "rate_noisy"):
            np.testing.assert_allclose(stats.statistic(layer, name), want[name], atol=1e-6, err_msg=name)
        cka = summary["cka"]["context"][str(layer)]
        idx = np.sort(np.random.default_rng(7).choice(WIDTH, size=16, replace=False))
        assert abs(cka - _direct_cka(clean[:, idx], noisy[:, idx])) < 1e-6

    for k in (3, 12):  # 0.25 * 48 = 12
        profile = NeutralizationProfile.load(tmp_path / "profiles" / f"tiny-k{k}.json")
        control = NeutralizationProfile.load(tmp_path / "profiles" / f"tiny-k{k}-random.json")
        profile.validate(loaded.model)
        control.validate(loaded.model)
        assert profile.model == model_shape(loaded.model)
        assert sorted(profile.neurons) == sorted(control.neurons) == [0, 2]
        for layer in (0, 2):
            assert profile.neurons[layer] == stats.top_k(layer, k, "mean_abs_diff")
            assert len(profile.neurons[layer]) == len(control.neurons[layer]) == k
            assert not set(profile.neurons[layer]) & set(control.neurons[layer])
        assert profile.neurons[0] != profile.neurons[2]  # each layer gets its own indices
        assert profile.provenance["method"] == "mean_abs_diff top-k per layer"
        assert profile.provenance["n_pairs"] == n_words and profile.provenance["data"] == "unit-test"
        assert control.provenance["seed"] == 7

    metrics = json.loads((tmp_path / "metrics" / "identify.json").read_text())
    assert set(metrics["cka"]) == {"context", "isolated"}
    assert all(0.0 <= v <= 1.0 + 1e-9 for m in metrics["cka"].values() for v in m.values())
    assert metrics["cka_method"]["method"] == "subsample" and metrics["cka_method"]["dim"] == 16
    assert set(metrics["sensitive_counts"]) == {"0", "2"}
    assert "_stats" not in metrics

    with np.load(tmp_path / "stats.npz") as data:
        assert data["isolated__mean_abs_diff"].shape == (2, WIDTH)
        assert not any(k.startswith("act") for k in data.files)
    reloaded = NeuronStats.load(tmp_path / "stats.npz", prefix="context__")
    assert reloaded.top_k(2, 3) == stats.top_k(2, 3)

    for png in ("cka_by_layer.png", "sensitive_neurons_by_layer.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_identify_rejects_bad_input(loaded, pairs):
    with pytest.raises(ValueError, match="Unknown ranking statistic"):
        identify(loaded, pairs, 3, statistic="biggest", progress=False)
    same = [_pair("Le chat dort .", "Le chat dort .", _identity(4))]
    with pytest.raises(ValueError, match="No altered words"):
        identify(loaded, same, 3, progress=False)


def test_cli_identify_from_pairs_file(tmp_path, loaded, pairs):
    from typer.testing import CliRunner

    from spacy_ocrneurons.cli import app
    from spacy_ocrneurons.modeling import save_label_map

    base = tmp_path / "base"
    loaded.model.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    save_label_map(base, LABELS)
    save_pairs(pairs, tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(app, [
        "identify", "--base", str(base), "--pairs", str(tmp_path / "pairs.jsonl"), "--k", "4", "--layers", "1-2",
        "--output-profiles", str(tmp_path / "profiles"), "--metrics", str(tmp_path / "m" / "identify.json"),
        "--plots", str(tmp_path / "plots"), "--statistic", "t_stat", "--device", "cpu", "--modes", "context",
    ])
    assert result.exit_code == 0, result.output
    profile = NeutralizationProfile.load(tmp_path / "profiles" / "ocr-sensitive-k4.json")
    assert sorted(profile.neurons) == [1, 2] and profile.provenance["statistic"] == "t_stat"
    assert (tmp_path / "profiles" / "ocr-sensitive-k4-random.json").exists()
    metrics = json.loads((tmp_path / "m" / "identify.json").read_text())
    assert list(metrics["cka"]) == ["context"] and metrics["provenance"]["data"].endswith("pairs.jsonl")
    assert (tmp_path / "m" / "identify_stats.npz").exists()


# ------------------------------------------------------------------------------------- data files

HEADER = "TOKEN\tNE-COARSE-LIT\tNE-COARSE-METO\tNE-FINE-LIT\tNE-FINE-METO\tNE-FINE-COMP\tNE-NESTED\tNEL-LIT\tNEL-METO\tMISC\n"


def _write_tsv(path, sentences_per_doc):
    lines = [HEADER]
    for d, sentences in enumerate(sentences_per_doc):
        lines.append(f"# hipe2022:document_id = doc-{d}\n")
        for sentence in sentences:
            words = sentence.split()
            for i, w in enumerate(words):
                tag = "B-loc" if w in ("Paris", "Lyon", "Bruxelles", "Rivoli") else "O"
                misc = []
                if i + 1 < len(words) and words[i + 1] in (".", ","):
                    misc.append("NoSpaceAfter")
                if i == len(words) - 1:
                    misc.append("EndOfSentence")
                lines.append("\t".join([w, tag] + ["O"] * 5 + ["_", "_", "|".join(misc) or "_"]) + "\n")
        lines.append("\n")
    path.write_text("".join(lines), encoding="utf8")
    return path


def test_read_aligned_pairs_from_hipe_and_spacy(tmp_path):
    from spacy_ocrneurons import noise
    from spacy_ocrneurons.hipe import convert_hipe_to_docbin
    from spacy_ocrneurons.identify import read_aligned_pairs, read_sentences

    tsv = _write_tsv(tmp_path / "clean.tsv", [TEXTS[:2], TEXTS[2:4] * 2])
    sentences = read_sentences(tsv)
    assert [" ".join(w) for w, _, _ in sentences] == TEXTS[:2] + TEXTS[2:4] * 2

    pairs = read_aligned_pairs(tsv, method="typed", level="high", seed=3)
    assert [p.clean_words for p in pairs] == [w for w, _, _ in sentences]
    words = [w for p in pairs for w in altered_words(p)]
    assert len(words) > 10
    assert any(len(w.clean_tokens) != len(w.noisy_tokens) for w in words)  # splits or merges survive
    again = read_aligned_pairs(tsv, method="typed", level="high", seed=3)
    assert [p.to_dict() for p in again] == [p.to_dict() for p in pairs]  # seeded

    # a noisy .spacy written by the noise module carries its alignment and gives the same pairs
    spacy_path = tmp_path / "clean.spacy"
    convert_hipe_to_docbin(tsv, spacy_path)
    noise.noise_file(spacy_path, tmp_path / "noisy.spacy", method="typed", level="high", seed=3)
    from_files = read_aligned_pairs(spacy_path, tmp_path / "noisy.spacy")
    made_here = read_aligned_pairs(spacy_path, method="typed", level="high", seed=3)
    assert [p.to_dict() for p in from_files] == [p.to_dict() for p in made_here]
    assert [p.clean_words for p in from_files] == [p.clean_words for p in pairs]

    # a noisy TSV has no alignment, and equal token counts do not imply 1-1 (split + merge): refused
    noise.noise_file(tsv, tmp_path / "typed.tsv", method="typed", level="high", seed=3)
    with pytest.raises(ValueError, match="carries the token alignment"):
        read_aligned_pairs(tsv, tmp_path / "typed.tsv")
    convert_hipe_to_docbin(tsv, tmp_path / "plain.spacy")
    with pytest.raises(ValueError, match="no token alignment"):
        read_aligned_pairs(tsv, tmp_path / "plain.spacy")


def test_cli_identify_from_clean_hipe(tmp_path, loaded):
    from typer.testing import CliRunner

    from spacy_ocrneurons.cli import app
    from spacy_ocrneurons.modeling import save_label_map

    base = tmp_path / "base"
    loaded.model.save_pretrained(base)
    loaded.tokenizer.save_pretrained(base)
    save_label_map(base, LABELS)
    tsv = _write_tsv(tmp_path / "clean.tsv", [TEXTS[:4]])
    result = CliRunner().invoke(app, [
        "identify", "--base", str(base), "--clean", str(tsv), "--noise-method", "typed", "--noise-level", "high",
        "--seed", "1", "--k", "2,10%", "--modes", "isolated", "--rank-mode", "isolated", "--max-sentences", "3",
        "--save-pairs", str(tmp_path / "pairs.jsonl"), "--output-profiles", str(tmp_path / "p"),
        "--metrics", str(tmp_path / "identify.json"), "--stats", str(tmp_path / "s.npz"), "--plots", str(tmp_path / "plots"),
        "--device", "cpu", "--cka-method", "projection", "--cka-max-dim", "8",
    ])
    assert result.exit_code == 0, result.output
    assert len(load_pairs(tmp_path / "pairs.jsonl")) == 3
    for k in (2, 5):  # 10% of 48 -> 5
        profile = NeutralizationProfile.load(tmp_path / "p" / f"ocr-sensitive-k{k}.json")
        assert sorted(profile.neurons) == [0, 1, 2] and all(len(v) == k for v in profile.neurons.values())
        assert profile.provenance["noise"] == "typed high seed=1" and profile.provenance["context_mode"] == "isolated"
    metrics = json.loads((tmp_path / "identify.json").read_text())
    assert metrics["cka_method"]["method"] == "projection" and metrics["stats"] == str(tmp_path / "s.npz")
    bad = CliRunner().invoke(app, ["identify", "--base", str(base), "--pairs", "x.jsonl", "--clean", str(tsv)])
    assert bad.exit_code == 1 and "either --clean" in bad.output
