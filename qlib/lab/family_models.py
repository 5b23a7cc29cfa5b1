"""Language models of other families for the lab's own tests, built offline: the smoke runs of the LM notebooks
also run on them, so a notebook that only works on Llama-style models fails a test.

* ``smollm2-135m-qwen2`` — SmolLM2-135M's weights in a ``Qwen2ForCausalLM`` (Qwen2 is Llama's layout plus q/k/v
  biases, set to zero here): the same function as SmolLM2, checked when built, so its perplexity is a real
  model's, under the Qwen2 family's code path.
* ``tiny-gpt2`` and ``tiny-opt`` — a GPT-2 (``Conv1D`` weights, learned positions, GELU) and an OPT (ReLU, learned
  positions with OPT's offset of 2) of 4 blocks, width 128, on a 1,024-token byte-level BPE trained here, each
  trained for a few hundred steps on the lab's ``calib`` text splits. Small and weak but far better than a unigram
  model, so every notebook's FP32 sanity guard passes; test models, not useful language models.

Every entry is cached like the zoo's models (``qlib.lab.models.cached_build``) and loaded with ``load_lm(key)``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

FAMILY_KEYS = ("smollm2-135m-qwen2", "tiny-gpt2", "tiny-opt")
TINY = dict(vocab=1024, width=128, blocks=4, heads=4, ffn=512, positions=1024, steps=400, batch=8, seq=128, lr=3e-3,
            seed=0)
NOTES = {
    "smollm2-135m-qwen2": "SmolLM2-135M's weights in a Qwen2 model (zero q/k/v biases): the same function, built here "
                          "to run the notebooks through the Qwen2 family's code",
    "tiny-gpt2": "a 4-block GPT-2 (width 128, 1,024-token BPE) trained here for 400 steps on the calib text splits: a "
                 "test model of the GPT-2 family (Conv1D weights), not a useful language model",
    "tiny-opt": "a 4-block OPT (width 128, 1,024-token BPE) trained here for 400 steps on the calib text splits: a "
                "test model of the OPT family, not a useful language model",
}
DISPLAY_NAMES = {"smollm2-135m-qwen2": "Qwen2-135M", "tiny-gpt2": "Tiny-GPT-2", "tiny-opt": "Tiny-OPT"}


def recipe(key: str) -> dict[str, Any] | None:
    """The settings an entry is built with (a changed recipe rebuilds it)."""
    return None if key == "smollm2-135m-qwen2" else {**TINY, "family": key}


def build(key: str, tmp: Path) -> dict:
    """Build one entry into ``tmp`` (a model folder with config, safetensors and tokenizer); return its meta."""
    if key == "smollm2-135m-qwen2":
        return _qwen2_from_smollm2(tmp)
    if key in ("tiny-gpt2", "tiny-opt"):
        return _tiny(key, tmp)
    raise ValueError(f"{key!r} is not a family test model; use one of {', '.join(FAMILY_KEYS)}")


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
    from tqdm.auto import tqdm

    from qlib.lab import data
    from qlib.lab.bench import num_threads

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
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 40) * 0.5 * (1 + math.cos(math.pi * s / r["steps"])))
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads(None))
    model.train()
    losses = []
    try:
        for _ in tqdm(range(r["steps"]), desc=f"train {key}", leave=False):
            starts = torch.randint(0, len(ids) - r["seq"] - 1, (r["batch"],), generator=g)
            batch = torch.stack([ids[s: s + r["seq"]] for s in starts.tolist()])
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(before)
    model.eval()
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"key": key, "architecture": cls.__name__, "params": sum(p.numel() for p in model.parameters()),
            "train_tokens": r["steps"] * r["batch"] * r["seq"], "final_loss": sum(losses[-20:]) / 20,
            "note": NOTES[key], "build_seconds": round(time.perf_counter() - start, 1)}
