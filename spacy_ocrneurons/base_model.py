"""Small base models built from scratch: a BPE tokenizer and tiny Llama/Mistral configs.

Nothing here downloads anything. Tests build tiny models in-process; the demo workflow trains a small
Llama-architecture causal LM on its own unlabeled text so that the LoRA step starts from a pretrained base,
as it does with a real Llama-2/Mistral checkpoint.
"""
from typing import Any, Iterable, List, Optional, Sequence

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000, model_max_length: int = 4096) -> Any:
    """Train a SentencePiece-style (Metaspace) BPE tokenizer, the kind Llama and Mistral use.

    Returns a ``LlamaTokenizerFast`` with ``<s>`` as BOS, ``</s>`` as EOS, ``<pad>`` for padding and
    ``<unk>`` for characters never seen in training (e.g. emoji).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = list(texts)
    alphabet = sorted({ch for t in texts for ch in t if not ch.isspace()})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
    )


def small_config(arch: str = "llama", vocab_size: int = 1000, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: Optional[int] = None,
                 intermediate_size: int = 128, max_position_embeddings: int = 4096, labels: Sequence[str] = (),
                 tokenizer: Any = None) -> Any:
    """A small ``LlamaConfig`` or ``MistralConfig`` (Mistral with a sliding window, as the real one)."""
    from transformers import LlamaConfig, MistralConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or max(1, num_attention_heads // 2),
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    if tokenizer is not None:
        kw.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if labels:
        kw.update(id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "mistral":
        return MistralConfig(sliding_window=max_position_embeddings, **kw)
    raise ValueError(f"Unknown architecture {arch!r}: use 'llama' or 'mistral'.")


def build_token_classifier(arch: str, tokenizer: Any, labels: List[str], seed: int = 0, **sizes: Any) -> Any:
    """A randomly initialised (seeded) Llama/Mistral token classifier with the given label order."""
    import torch
    from transformers import AutoModelForTokenClassification

    config = small_config(arch, labels=labels, tokenizer=tokenizer, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_config(config)
    model.eval()
    return model


def pretrain_causal_lm(model: Any, tokenizer: Any, texts: Sequence[str], *, steps: int = 300, batch_size: int = 16,
                       block_size: int = 128, lr: float = 3e-3, weight_decay: float = 0.01, warmup_ratio: float = 0.05,
                       schedule: str = "cosine", max_grad_norm: float = 1.0, seed: int = 0, eval_blocks: int = 32,
                       progress: bool = True) -> dict:
    """Train a causal LM on ``texts`` (next-piece prediction) with AdamW and a warmup + cosine/linear schedule.

    The texts are encoded as ``<s> text </s>`` and concatenated into one stream; each step reads ``batch_size``
    random blocks of ``block_size`` pieces (seeded). The model is trained in place, on the device it is on.
    Returns ``{"loss_before", "loss_after", "losses", "steps", "stream_pieces", "block_size", ...}``, where the
    before/after losses are measured on the same fixed blocks in eval mode.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stream: List[int] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            stream += ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
    if len(stream) < 2:
        raise ValueError("The texts give fewer than 2 word pieces: nothing to pretrain on.")
    block_size = min(block_size, len(stream) - 1)
    device = next(model.parameters()).device
    data = torch.tensor(stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    n_starts = len(stream) - block_size + 1

    def blocks(n: int) -> Any:
        starts = torch.randint(0, n_starts, (n,), generator=gen)
        return torch.stack([data[s:s + block_size] for s in starts.tolist()]).to(device)

    eval_batch = blocks(eval_blocks)

    def eval_loss() -> float:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = float(model(input_ids=eval_batch, labels=eval_batch).loss)
        model.train(was_training)
        return loss

    torch.manual_seed(seed)
    loss_before = eval_loss()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=int(round(warmup_ratio * steps)),
                              num_training_steps=steps)
    losses: List[float] = []
    model.train()
    bar = tqdm(range(steps), desc="pretrain", unit="step", disable=not progress)
    for _ in bar:
        batch = blocks(batch_size)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return {"loss_before": loss_before, "loss_after": eval_loss(), "losses": losses, "steps": steps,
            "batch_size": batch_size, "block_size": block_size, "stream_pieces": len(stream), "lr": lr,
            "schedule": schedule, "seed": seed}


def build_demo_base_model(texts: Iterable[str], output_dir: Any, arch: str = "llama", vocab_size: int = 2000,
                          hidden_size: int = 128, layers: int = 4, intermediate_size: int = 344, heads: int = 4,
                          kv_heads: Optional[int] = None, steps: int = 300, batch_size: int = 16,
                          block_size: int = 128, lr: float = 3e-3, seed: int = 0, progress: bool = True) -> Any:
    """Train a BPE tokenizer and a small Llama/Mistral causal LM on unlabeled ``texts``; save it as a normal HF
    checkpoint (model + tokenizer + ``pretraining.json``) in ``output_dir`` and return that path.

    ``AutoModelForTokenClassification.from_pretrained(output_dir)`` loads it (with a new classifier head), so the
    LoRA step starts from a pretrained base as it does with a real Llama-2/Mistral checkpoint.
    """
    import json
    import time
    from pathlib import Path

    import torch
    from transformers import LlamaForCausalLM, MistralForCausalLM

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("No texts to build the base model from.")
    start = time.time()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    config = small_config(arch, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads or heads, intermediate_size=intermediate_size,
                          tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if arch == "llama" else MistralForCausalLM)(config)
    stats = pretrain_causal_lm(model, tokenizer, texts, steps=steps, batch_size=batch_size, block_size=block_size,
                               lr=lr, seed=seed, progress=progress)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    info = {
        "what": "demo base model: BPE tokenizer + small causal LM trained from scratch on unlabeled text",
        "arch": arch, "vocab_size": len(tokenizer), "hidden_size": hidden_size, "layers": layers,
        "intermediate_size": intermediate_size, "heads": heads, "kv_heads": kv_heads or heads,
        "texts": len(texts), "elapsed_s": round(time.time() - start, 2), "torch_threads": torch.get_num_threads(),
        **{k: v for k, v in stats.items() if k != "losses"},
        "loss_curve": [round(sum(stats["losses"][i:i + 50]) / len(stats["losses"][i:i + 50]), 4)
                       for i in range(0, len(stats["losses"]), 50)],
    }
    (out / "pretraining.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf8")
    return out
