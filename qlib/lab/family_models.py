"""Language models of other families for the lab's own tests, built offline: the smoke runs of the LM notebooks
also run on them, so a notebook that only works on Llama-style models fails a test.

* ``smollm2-135m-qwen2`` — SmolLM2-135M's weights in a ``Qwen2ForCausalLM`` (Qwen2 is Llama's layout plus q/k/v
  biases, set to zero here): the same function as SmolLM2, checked when built, so its perplexity is a real
  model's, under the Qwen2 family's code path.
* ``tiny-gpt2`` and ``tiny-opt`` — a GPT-2 (``Conv1D`` weights, learned positions, GELU) and an OPT (ReLU, learned
  positions with OPT's offset of 2) of 4 blocks, width 128, on a 1,024-token byte-level BPE trained here, each
  trained for 150 steps on the lab's ``calib`` text splits. Small and weak but better than a unigram model of the
  text, so every notebook's FP32 sanity guard passes; test models, not useful language models.
* ``tiny-distilbert-sentiment`` and ``tiny-roberta-sentiment`` — 2-block encoders of those families trained from
  scratch on the movie-sentiment train split (their own WordPiece / byte-level BPE), for the classifier notebooks.

Every entry is cached like the zoo's models (``qlib.lab.models.cached_build``) and loaded with ``load_lm(key)``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

FAMILY_KEYS = ("smollm2-135m-qwen2", "tiny-gpt2", "tiny-opt")
CLASSIFIER_FAMILY_KEYS = ("tiny-distilbert-sentiment", "tiny-roberta-sentiment")
TINY_CLF = dict(vocab=2048, width=128, blocks=2, heads=4, ffn=512, positions=130, steps=150, batch=32, max_length=64,
                lr=2e-3, seed=0, vocab_ids="specials, then sorted")
TRAIN_THREADS = 2  # the lab machine has 2 cores
TINY = dict(vocab=1024, width=128, blocks=4, heads=4, ffn=512, positions=1024, steps=150, batch=8, seq=128, lr=3e-3,
            seed=0)  # about 12 s on 2 cores: the smoke runs that use it pay for its training
NOTES = {
    "smollm2-135m-qwen2": "SmolLM2-135M's weights in a Qwen2 model (zero q/k/v biases): the same function, built here "
                          "to run the notebooks through the Qwen2 family's code",
    "tiny-gpt2": f"a 4-block GPT-2 (width 128, 1,024-token BPE) trained here for {TINY['steps']} steps on the calib text "
                 "splits: a test model of the GPT-2 family (Conv1D weights), not a useful language model",
    "tiny-opt": f"a 4-block OPT (width 128, 1,024-token BPE) trained here for {TINY['steps']} steps on the calib text "
                "splits: a test model of the OPT family, not a useful language model",
}
NOTES.update({
    "tiny-distilbert-sentiment": "a 2-block DistilBERT (width 128, 2,048-token WordPiece) trained here from scratch "
                                 f"for {TINY_CLF['steps']} steps on the movie-sentiment train split: a test model of the "
                                 "DistilBERT family",
    "tiny-roberta-sentiment": "a 2-block RoBERTa (width 128, 2,048-token byte-level BPE) trained here from scratch for "
                              f"{TINY_CLF['steps']} steps on the movie-sentiment train split: a test model of the RoBERTa "
                              "family",
})
DISPLAY_NAMES = {"tiny-distilbert-sentiment": "Tiny-DistilBERT sentiment", "tiny-roberta-sentiment": "Tiny-RoBERTa sentiment",
                 "smollm2-135m-qwen2": "Qwen2-135M", "tiny-gpt2": "Tiny-GPT-2", "tiny-opt": "Tiny-OPT"}


def recipe(key: str) -> dict[str, Any] | None:
    """The settings an entry is built with (a changed recipe rebuilds it)."""
    if key == "smollm2-135m-qwen2":
        return None
    return {**(TINY_CLF if key in CLASSIFIER_FAMILY_KEYS else TINY), "family": key}


def _train(model: torch.nn.Module, loss_of, batches: list, r: dict[str, Any], key: str) -> None:
    """AdamW with 40 warm-up steps and a cosine decay over ``r["steps"]``, gradients clipped to norm 1, on the lab's
    training threads (``qlib.lab.models.train_steps``); the model is left in eval mode."""
    from qlib.lab.bench import num_threads
    from qlib.lab.models import train_steps

    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 40) * 0.5 * (1 + math.cos(math.pi * s / r["steps"])))
    with num_threads(TRAIN_THREADS):
        train_steps(model, loss_of, batches, opt, sched, f"train {key}", progress=True, clip_norm=1.0)
    model.eval()


def build(key: str, tmp: Path) -> dict:
    """Build one entry into ``tmp`` (a model folder with config, safetensors and tokenizer); return its meta."""
    if key == "smollm2-135m-qwen2":
        return _qwen2_from_smollm2(tmp)
    if key in ("tiny-gpt2", "tiny-opt"):
        return _tiny(key, tmp)
    if key in CLASSIFIER_FAMILY_KEYS:
        return _tiny_classifier(key, tmp)
    raise ValueError(f"{key!r} is not a family test model; use one of {', '.join(FAMILY_KEYS + CLASSIFIER_FAMILY_KEYS)}")


def _qwen2_from_smollm2(tmp: Path) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qlib.lab.models import load_lm

    start = time.perf_counter()
    llama, tokenizer = load_lm("smollm2-135m")
    c = llama.config
    config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, hidden_act=c.hidden_act,
                         max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                         rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=True,
                         bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                         use_sliding_window=False)
    qwen = Qwen2ForCausalLM(config).eval()
    state = llama.state_dict()
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name in state:
                p.copy_(state[name])
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.zero_()
            else:
                raise RuntimeError(f"{name} of Qwen2 has no SmolLM2 counterpart")
    qwen.tie_weights()
    ids = tokenizer("Quantization trades a little accuracy for a lot of speed.", return_tensors="pt").input_ids
    with torch.inference_mode():
        diff = (qwen(ids).logits - llama(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"the Qwen2 copy of SmolLM2 computes other logits (max difference {diff:.3g})")
    qwen.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"key": "smollm2-135m-qwen2", "architecture": type(qwen).__name__, "source": "smollm2-135m",
            "max_abs_logit_diff_vs_source": diff, "note": NOTES["smollm2-135m-qwen2"],
            "build_seconds": round(time.perf_counter() - start, 1)}


def _train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny(key: str, tmp: Path) -> dict:
    import transformers as T

    from qlib.lab import data

    r = TINY
    start = time.perf_counter()
    texts = [data.text(d, "calib") for d in data.TEXT_DOMAINS]
    tokenizer = _train_tokenizer(texts, r["vocab"])
    eos = tokenizer.eos_token_id
    ids = torch.tensor([t for text in texts for t in tokenizer(text).input_ids + [eos]], dtype=torch.long)
    if key == "tiny-gpt2":
        config = T.GPT2Config(vocab_size=len(tokenizer), n_embd=r["width"], n_layer=r["blocks"], n_head=r["heads"],
                              n_inner=r["ffn"], n_positions=r["positions"], bos_token_id=eos, eos_token_id=eos)
        cls = T.GPT2LMHeadModel
    else:
        config = T.OPTConfig(vocab_size=len(tokenizer), hidden_size=r["width"], num_hidden_layers=r["blocks"],
                             num_attention_heads=r["heads"], ffn_dim=r["ffn"], max_position_embeddings=r["positions"],
                             word_embed_proj_dim=r["width"], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                             dropout=0.0, attention_dropout=0.0)
        cls = T.OPTForCausalLM
    torch.manual_seed(r["seed"])
    model = cls(config)
    g = torch.Generator().manual_seed(r["seed"])
    starts = [torch.randint(0, len(ids) - r["seq"] - 1, (r["batch"],), generator=g).tolist() for _ in range(r["steps"])]
    losses = []

    def loss_of(batch_starts: list[int]) -> torch.Tensor:
        batch = torch.stack([ids[s: s + r["seq"]] for s in batch_starts])
        loss = model(batch, labels=batch).loss
        losses.append(loss.item())
        return loss

    _train(model, loss_of, starts, r, key)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"key": key, "architecture": cls.__name__, "params": sum(p.numel() for p in model.parameters()),
            "train_tokens": r["steps"] * r["batch"] * r["seq"], "final_loss": sum(losses[-20:]) / 20,
            "note": NOTES[key], "build_seconds": round(time.perf_counter() - start, 1)}


def _classifier_tokenizer(key: str, texts: list[str], vocab: int):
    """A WordPiece tokenizer (DistilBERT's kind) or a byte-level BPE (RoBERTa's), trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if key == "tiny-distilbert-sentiment":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tk.normalizer = normalizers.BertNormalizer(lowercase=True)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        tk.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=special,
                                                                show_progress=False))
        # the trainer finds the same tokens every time but numbers them in hash order: renumber them (specials first,
        # then sorted) so the model built on top is the same on every build
        learned = sorted(set(tk.get_vocab()) - set(special))
        tk.model = models.WordPiece({t: i for i, t in enumerate(special + learned)}, unk_token="[UNK]")
        cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
        tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                          special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")), ("<s>", tk.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def _tiny_classifier(key: str, tmp: Path) -> dict:
    import numpy as np
    import transformers as T

    from qlib.lab.bench import num_threads
    from qlib.lab.data import sentiment_dataset
    from qlib.lab.models import text_accuracy

    r = TINY_CLF
    start = time.perf_counter()
    texts, labels = sentiment_dataset("train")
    tokenizer = _classifier_tokenizer(key, texts, r["vocab"])
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    common = dict(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    if key == "tiny-distilbert-sentiment":
        config = T.DistilBertConfig(vocab_size=len(tokenizer), dim=r["width"], hidden_dim=r["ffn"], n_layers=r["blocks"],
                                    n_heads=r["heads"], max_position_embeddings=r["positions"],
                                    pad_token_id=tokenizer.pad_token_id, **common)
        cls = T.DistilBertForSequenceClassification
    else:
        config = T.RobertaConfig(vocab_size=len(tokenizer), hidden_size=r["width"], intermediate_size=r["ffn"],
                                 num_hidden_layers=r["blocks"], num_attention_heads=r["heads"],
                                 max_position_embeddings=r["positions"], pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **common)
        cls = T.RobertaForSequenceClassification
    torch.manual_seed(r["seed"])
    model = cls(config)
    g = torch.Generator().manual_seed(r["seed"])
    batches = [torch.randint(0, len(texts), (r["batch"],), generator=g).tolist() for _ in range(r["steps"])]

    def loss_of(idx: list[int]) -> torch.Tensor:
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=r["max_length"],
                        return_tensors="pt")
        return model(**enc, labels=labels_t[idx]).loss

    _train(model, loss_of, batches, r, key)
    test_texts, test_labels = sentiment_dataset("test")
    with num_threads(TRAIN_THREADS):
        acc = text_accuracy(model, tokenizer, list(test_texts), np.asarray(test_labels), r["max_length"])
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"key": key, "architecture": cls.__name__, "params": sum(p.numel() for p in model.parameters()),
            "test_accuracy": round(acc, 4), "note": NOTES[key],
            "build_seconds": round(time.perf_counter() - start, 1)}
