"""The ocrneurons_ner component: registration, inference, neutralization (fold ≡ hook), serialization, errors."""
import json
import subprocess
import sys
import textwrap

import pytest
import spacy
import torch

from spacy_ocrneurons.component import ConfigError
from spacy_ocrneurons.modeling import ModelLoadError, forward_logits, load_token_classifier
from spacy_ocrneurons.profile import NeutralizationProfile, ProfileError

from .conftest import FRENCH_TEXTS, save_tiny_adapter, save_tiny_checkpoint


def _bias_for(labels, favourite, strength=20.0):
    return [strength if l == favourite else 0.0 for l in labels]


def _profile_for(model_dir, neurons, factor):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    return NeutralizationProfile(
        neurons=neurons, factor=factor,
        model={"num_hidden_layers": cfg.num_hidden_layers, "intermediate_size": cfg.intermediate_size},
    )


def test_factory_is_registered_through_the_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="spacy_factories")}
    assert names.get("ocrneurons_ner") == "spacy_ocrneurons.component:make_ocrneurons_ner"
    code = "import spacy; nlp = spacy.blank('fr'); print(nlp.has_factory('ocrneurons_ner'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_add_pipe_sets_ents_every_token_b_loc(tmp_path, tokenizer, labels):
    save_tiny_checkpoint(tmp_path, "llama", tokenizer, labels, head_bias=_bias_for(labels, "B-loc"))
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp_path)})
    doc = nlp("Le député Reinach à Paris")
    assert [(e.text, e.label_) for e in doc.ents] == [(t.text, "loc") for t in doc]
    assert all(0.99 < e._.confidence <= 1.0 for e in doc.ents)


def test_invalid_i_tags_are_repaired_into_one_valid_entity(tmp_path, tokenizer, labels):
    # every piece predicts I-pers: repair turns the first into B-pers; tokens sharing a piece ("Paris.") stay inside
    save_tiny_checkpoint(tmp_path, "mistral", tokenizer, labels, head_bias=_bias_for(labels, "I-pers"))
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp_path)})
    doc = nlp("M. Reinach  à\nParis.")
    assert len(doc.ents) == 1
    ent = doc.ents[0]
    assert ent.label_ == "pers" and ent.start == 0 and ent.end == len(doc)
    assert [t.ent_iob_ for t in doc][:2] == ["B", "I"]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t", "\x00\x07\x1b", "😀🎉", "Paris 😀 \u200b Lyon\x0c", "a" * 3])
def test_odd_texts_never_crash(tiny_checkpoint, text):
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(tiny_checkpoint)})
    doc = nlp(text)
    for ent in doc.ents:
        assert 0 <= ent.start < ent.end <= len(doc)
        assert not doc[ent.start].is_space and not doc[ent.end - 1].is_space


def test_alignment_regression_metaspace_token_not_aligned_to_next_word(tokenizer):
    """spaCy issue 13730: with Metaspace pieces ('▁Paris' has the offset of the space before it), spacy-transformers
    aligned a token to the next word's first piece too. Each token must own exactly its own first piece."""
    from spacy_ocrneurons.alignment import encode_text, token_char_spans

    nlp = spacy.blank("fr")
    doc = nlp("Le député  Théodore\nReinach est à Paris.")
    enc = encode_text(tokenizer, doc.text, token_char_spans(doc))
    pieces = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert any(p.startswith("▁") for p in pieces)
    for tok, p in zip(doc, enc.first_piece):
        if tok.is_space:
            assert p == -1, (tok.text, p)
            continue
        assert p >= 0, tok.text
        start, end = enc.offsets[p]
        piece_text = doc.text[start:end].lstrip()
        # the first piece starts at the token's own first character, never at the previous/next word
        assert start + (end - start - len(piece_text)) == tok.idx, (tok.text, pieces[p])
    owned = [p for p in enc.first_piece if p >= 0]
    assert len(owned) == len(set(owned))


def test_long_document_gets_labels_to_its_last_token(tmp_path, tokenizer, labels):
    save_tiny_checkpoint(tmp_path, "llama", tokenizer, labels, head_bias=_bias_for(labels, "B-org"))
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp_path), "max_length": 64, "stride": 16, "batch_size": 512})
    words = " ".join(FRENCH_TEXTS) + " "
    text = (words * 400)[:]  # ~ 20,000 spaCy tokens
    doc = nlp(text)
    assert len(doc) > 19000
    owned_last = [t for t in doc if not t.is_space and t.ent_type_ == "org"]
    assert doc[-1].is_space or doc[-1].ent_type_ == "org" or doc[-1].text in ".,"
    assert owned_last[-1].i >= len(doc) - 3
    assert len(doc.ents) > 0.8 * len([t for t in doc if not t.is_punct and not t.is_space])


def test_windowing_equals_single_window_when_text_fits(tmp_path, tokenizer, labels):
    from spacy_ocrneurons.alignment import token_char_spans
    from spacy_ocrneurons.modeling import tag_texts

    save_tiny_checkpoint(tmp_path, "llama", tokenizer, labels, seed=5)
    loaded = load_token_classifier(tmp_path)
    doc = spacy.blank("fr")(FRENCH_TEXTS[0])
    items = [(doc.text, token_char_spans(doc))]
    one = tag_texts(loaded, items, max_length=512)
    windowed = tag_texts(loaded, items, max_length=12, stride=4)
    assert len(one[0]) == len(windowed[0]) == len(doc)
    # the first window's tokens see the same left context in both runs
    assert one[0][:3] == windowed[0][:3]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("with_adapter", [False, True])
def test_folded_profile_equals_hooked_profile(tmp_path, tokenizer, labels, arch, with_adapter):
    base = tmp_path / "base"
    save_tiny_checkpoint(base, arch, tokenizer, labels, seed=7)
    adapter = None
    if with_adapter:
        adapter = tmp_path / "lora"
        save_tiny_adapter(adapter, base, labels, seed=2)
    profile = _profile_for(base, {0: [1, 5, 17, 100], 1: [3, 64]}, factor=0.1)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(FRENCH_TEXTS[1], add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    hooked_model = load_token_classifier(base, adapter, merge=False)
    with torch.inference_mode():
        plain = forward_logits(hooked_model, ids, mask)
        with profile.apply(hooked_model.model):
            hooked = forward_logits(hooked_model, ids, mask)
        after = forward_logits(hooked_model, ids, mask)
    folded_model = load_token_classifier(base, adapter, merge=True)
    profile.fold(folded_model.model)
    with torch.inference_mode():
        folded = forward_logits(folded_model, ids, mask)
    assert not torch.allclose(plain, hooked, atol=1e-4)  # the profile does something
    assert torch.allclose(folded, hooked, atol=1e-5), (folded - hooked).abs().max()
    assert torch.equal(after, plain)  # hooks removed


def test_hooks_removed_even_on_error(llama_checkpoint):
    loaded = load_token_classifier(llama_checkpoint)
    profile = _profile_for(llama_checkpoint, {0: [1]}, 0.0)
    with pytest.raises(RuntimeError):
        with profile.apply(loaded.model):
            raise RuntimeError("boom")
    from spacy_ocrneurons.architectures import decoder_layers

    assert all(len(layer.mlp.up_proj._forward_hooks) == 0 for layer in decoder_layers(loaded.model))


def test_factor_one_changes_nothing_and_aggressive_profile_changes_predictions(tmp_path, llama_checkpoint):
    from transformers import AutoConfig

    width = AutoConfig.from_pretrained(llama_checkpoint).intermediate_size
    texts = FRENCH_TEXTS * 2

    def run(profile_path, factor=None):
        nlp = spacy.blank("fr")
        cfg = {"model": str(llama_checkpoint), "profile": profile_path, "factor": factor}
        nlp.add_pipe("ocrneurons_ner", config=cfg)
        ner = nlp.get_pipe("ocrneurons_ner")
        docs = list(nlp.pipe(texts))
        return [[(t.ent_iob_, t.ent_type_) for t in d] for d in docs], ner.predict(docs)

    base_ents, base_pred = run(None)
    everything = _profile_for(llama_checkpoint, {0: list(range(width)), 1: list(range(width))}, factor=1.0)
    everything.save(tmp_path / "all.json")
    same_ents, same_pred = run(str(tmp_path / "all.json"))
    assert same_ents == base_ents
    assert all(abs(a[1] - b[1]) < 1e-5 for x, y in zip(base_pred, same_pred) for a, b in zip(x, y))
    changed_ents, changed_pred = run(str(tmp_path / "all.json"), factor=0.0)
    flat_base = [a for x in base_pred for a in x]
    flat_changed = [a for x in changed_pred for a in x]
    assert max(abs(a[1] - b[1]) for a, b in zip(flat_base, flat_changed)) > 1e-3
    assert changed_ents != base_ents


def test_to_disk_and_spacy_load_round_trip_in_fresh_process(tmp_path, tokenizer, labels):
    base = tmp_path / "base"
    save_tiny_checkpoint(base, "mistral", tokenizer, labels, seed=11)
    adapter = tmp_path / "lora"
    save_tiny_adapter(adapter, base, labels, seed=4)
    profile = _profile_for(base, {1: [2, 9, 33]}, factor=0.3)
    profile.save(tmp_path / "profile.json")
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(base), "adapter": str(adapter),
                                           "profile": str(tmp_path / "profile.json")})
    expected = [[(e.start_char, e.end_char, e.label_) for e in doc.ents] for doc in nlp.pipe(FRENCH_TEXTS)]
    assert any(expected)
    out = tmp_path / "pipeline"
    nlp.to_disk(out)
    assert (out / "ocrneurons_ner" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "ocrneurons_ner" / "profile.json").read_text())["neurons"] == {"1": [2, 9, 33]}
    code = textwrap.dedent(f"""
        import json, sys, spacy
        nlp = spacy.load({str(out)!r})
        assert "spacy_ocrneurons" not in sys.modules or True
        texts = json.loads(sys.stdin.read())
        print(json.dumps([[(e.start_char, e.end_char, e.label_) for e in d.ents] for d in nlp.pipe(texts)]))
    """)
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(FRENCH_TEXTS), capture_output=True,
                         text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == [[list(x) for x in d] for d in expected]


def test_include_base_makes_a_self_contained_pipeline(tmp_path, tokenizer, labels):
    base = tmp_path / "base"
    save_tiny_checkpoint(base, "llama", tokenizer, labels, seed=12, head_bias=_bias_for(labels, "B-pers", 3.0))
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(base), "include_base": True})
    expected = [(e.text, e.label_) for e in nlp(FRENCH_TEXTS[2]).ents]
    nlp.to_disk(tmp_path / "pipe")
    import shutil

    shutil.rmtree(base)
    nlp2 = spacy.load(tmp_path / "pipe")
    assert [(e.text, e.label_) for e in nlp2(FRENCH_TEXTS[2]).ents] == expected


def test_missing_base_after_save_names_the_expected_path(tmp_path, tokenizer, labels):
    base = tmp_path / "base"
    save_tiny_checkpoint(base, "llama", tokenizer, labels)
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(base)})
    nlp.to_disk(tmp_path / "pipe")
    base.rename(tmp_path / "moved")
    with pytest.raises(ModelLoadError, match=str(base)):
        spacy.load(tmp_path / "pipe")


def test_missing_model_and_adapter_paths_are_named(tmp_path, llama_checkpoint):
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp_path / "nope")})
    with pytest.raises(ModelLoadError, match="nope"):
        nlp("Paris")
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(llama_checkpoint), "adapter": str(tmp_path / "no-lora")})
    with pytest.raises(ModelLoadError, match="no-lora"):
        nlp("Paris")


def test_bad_config_shows_a_valid_config():
    nlp = spacy.blank("fr")
    with pytest.raises(ConfigError, match=r"\[components.ocrneurons_ner\]"):
        nlp.add_pipe("ocrneurons_ner", config={"model": "/x", "dtype": "float8"})
    with pytest.raises(ConfigError, match="required"):
        spacy.blank("fr").add_pipe("ocrneurons_ner")


def test_unsupported_architecture_is_a_clear_error(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2ForTokenClassification

    from spacy_ocrneurons.architectures import UnsupportedArchitectureError
    from spacy_ocrneurons.modeling import save_label_map

    model = GPT2ForTokenClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), num_labels=3))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    save_label_map(tmp_path, ["O", "B-x", "I-x"])
    with pytest.raises(UnsupportedArchitectureError, match="GPT2"):
        load_token_classifier(tmp_path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["neurons"].update({"9": [1]}), "layer 9 does not exist"),
        (lambda d: d["neurons"].update({"1": [1, 100000]}), "layer 1: neuron index 100000 is out of range"),
        (lambda d: d["neurons"].update({"0": [3, 3]}), "layer 0: neuron index 3 is listed twice"),
        (lambda d: d.update({"factor": -0.5}), "factor must be >= 0"),
        (lambda d: d["model"].update({"num_hidden_layers": 32}), "num_hidden_layers=32"),
        (lambda d: d["model"].update({"intermediate_size": 14336}), "intermediate_size=14336"),
        (lambda d: d.update({"format": "something-else"}), "'format' is 'something-else'"),
        (lambda d: d["neurons"].update({"x": [1]}), "layer key 'x'"),
    ],
)
def test_bad_profiles_name_profile_layer_and_value(tmp_path, llama_checkpoint, mutate, message):
    good = _profile_for(llama_checkpoint, {0: [1, 2]}, 0.5).to_dict()
    mutate(good)
    path = tmp_path / "bad-profile.json"
    path.write_text(json.dumps(good))
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(llama_checkpoint), "profile": str(path)})
    with pytest.raises(ProfileError) as err:
        nlp("Paris")
    assert message in str(err.value)
    assert "bad-profile.json" in str(err.value)


def test_profile_file_round_trip_keeps_unknown_fields(tmp_path):
    data = {
        "format": "spacy-ocrneurons/profile", "version": 1, "model": {"num_hidden_layers": 2},
        "site": "mlp.up_proj", "factor": 0.5, "neurons": {"3": [12], "2": [455, 17]},
        "provenance": {"method": "test"}, "heads": {"1": [0, 3]},
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    profile = NeutralizationProfile.load(path)
    assert profile.neurons == {3: [12], 2: [455, 17]}
    profile.save(tmp_path / "q.json")
    again = json.loads((tmp_path / "q.json").read_text())
    assert again["heads"] == {"1": [0, 3]}
    assert again["neurons"] == {"2": [17, 455], "3": [12]}


def test_random_control_keeps_layers_and_counts():
    p = NeutralizationProfile(neurons={0: [1, 2, 3], 5: [7]}, factor=0.2, model={"intermediate_size": 50})
    c = p.random_control(seed=1)
    assert {k: len(v) for k, v in c.neurons.items()} == {0: 3, 5: 1}
    assert not set(c.neurons[0]) & {1, 2, 3}
    assert c.factor == 0.2 and c.provenance["method"] == "random-control"
    assert p.random_control(seed=1).neurons == c.neurons


def test_nlp_evaluate_reports_entity_scores(tmp_path, tokenizer, labels):
    from spacy.training import Example

    save_tiny_checkpoint(tmp_path, "llama", tokenizer, labels, head_bias=_bias_for(labels, "B-loc"))
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp_path)})
    gold = nlp.make_doc("Paris et Lyon")
    example = Example.from_dict(gold, {"entities": [(0, 5, "loc"), (9, 13, "loc")]})
    scores = nlp.evaluate([example])
    assert scores["ents_p"] == pytest.approx(2 / 3)
    assert scores["ents_r"] == pytest.approx(1.0)
    assert scores["ents_per_type"]["loc"]["r"] == pytest.approx(1.0)


def test_pickled_component_reloads_lazily_instead_of_copying_weights(tmp_path, tokenizer, labels):
    import pickle

    save_tiny_checkpoint(tmp_path, "llama", tokenizer, labels, head_bias=_bias_for(labels, "B-loc"))
    nlp = spacy.blank("fr")
    ner = nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp_path)})
    expected = [(e.text, e.label_) for e in nlp("Paris et Lyon").ents]
    assert ner._loaded is not None
    clone = pickle.loads(pickle.dumps(ner))
    assert clone._loaded is None
    assert [(e.text, e.label_) for e in clone(nlp.make_doc("Paris et Lyon")).ents] == expected


def test_other_gated_mlp_family_qwen2_works_through_the_component(tmp_path, tokenizer, labels):
    """Families with the same mlp.up_proj/gate_proj/down_proj names (here Qwen2) work without special-casing."""
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    from spacy_ocrneurons.modeling import save_label_map

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    Qwen2ForTokenClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    save_label_map(tmp_path, labels)
    profile = _profile_for(tmp_path, {1: [0, 7, 47]}, factor=0.0)
    loaded = load_token_classifier(tmp_path)
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(FRENCH_TEXTS[0], add_special_tokens=False)["input_ids"]])
    with torch.inference_mode(), profile.apply(loaded.model):
        hooked = forward_logits(loaded, ids, torch.ones_like(ids))
    profile.fold(loaded.model)
    with torch.inference_mode():
        folded = forward_logits(loaded, ids, torch.ones_like(ids))
    assert torch.allclose(hooked, folded, atol=1e-5)
    nlp = spacy.blank("fr")
    nlp.add_pipe("ocrneurons_ner", config={"model": str(tmp_path)})
    assert len(nlp(FRENCH_TEXTS[0])) > 0
