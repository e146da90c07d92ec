"""Shared fixtures: a tiny Metaspace BPE tokenizer and tiny random Llama/Mistral token classifiers, built in-process."""
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FRENCH_TEXTS = [
    "M. Théodore Reinach, député radical de la Savoie, a quitté Paris le 12 janvier 1908.",
    "Le Conseil municipal de Lyon s'est réuni hier sous la présidence de M. Augagneur.",
    "On annonce de Genève la mort de Mme Dupont, veuve du célèbre banquier.",
    "La Compagnie des chemins de fer du Nord a publié ses recettes de décembre.",
    "Le Journal de Genève rapporte que le roi Édouard est arrivé à Marseille.",
    "L'Académie française a élu hier M. Henri Poincaré au fauteuil de Sully Prudhomme.",
]
ENTITY_TYPES = ["loc", "org", "pers", "time"]


def _tokenizer():
    from spacy_ocrneurons.base_model import train_bpe_tokenizer

    return train_bpe_tokenizer(FRENCH_TEXTS * 5, vocab_size=300)


@pytest.fixture(scope="session")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def labels():
    from spacy_ocrneurons.alignment import label_list

    return label_list(ENTITY_TYPES)


def save_tiny_checkpoint(path, arch, tokenizer, labels, seed=0, head_bias=None, **sizes):
    """A merged tiny token classifier saved as an HF checkpoint with labels.json; returns the model."""
    import torch

    from spacy_ocrneurons.base_model import build_token_classifier
    from spacy_ocrneurons.modeling import save_label_map

    model = build_token_classifier(arch, tokenizer, labels, seed=seed, **sizes)
    if head_bias is not None:
        with torch.no_grad():
            model.score.bias.copy_(torch.tensor(head_bias, dtype=model.score.bias.dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_label_map(path, labels)
    return model


def save_tiny_adapter(path, base_dir, labels, seed=1, bidirectional=False):
    """A random (non-zero) LoRA adapter on up_proj with the classifier head in modules_to_save."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForTokenClassification

    from spacy_ocrneurons.modeling import save_label_map

    torch.manual_seed(seed)
    base = AutoModelForTokenClassification.from_pretrained(base_dir, num_labels=len(labels))
    cfg = LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                     target_modules=["up_proj", "down_proj"], modules_to_save=["score"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        head = peft_model.base_model.model.score.modules_to_save["default"]
        head.weight.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    save_label_map(path, labels, bidirectional=bidirectional)
    return peft_model


@pytest.fixture(scope="session", params=["llama", "mistral"])
def tiny_checkpoint(request, tmp_path_factory, tokenizer, labels):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    save_tiny_checkpoint(path, request.param, tokenizer, labels, seed=3)
    return path


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory, tokenizer, labels):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_checkpoint(path, "llama", tokenizer, labels, seed=3)
    return path


@pytest.fixture(scope="session")
def llama_adapter(tmp_path_factory, llama_checkpoint, labels):
    path = tmp_path_factory.mktemp("tiny-llama-lora")
    save_tiny_adapter(path, llama_checkpoint, labels)
    return path
