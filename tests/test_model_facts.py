"""model_facts reads names and sizes from the model; check_baseline refuses a broken FP32 baseline."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlib.lab.eval import check_baseline, lm_windows, perplexity, unigram_perplexity
from qlib.lab.models import display_name, model_facts

VOCAB = 64


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def cyclic_stream(n: int = 2048, period: int = 16) -> torch.Tensor:
    """A text whose next token is fully determined: ``period`` distinct tokens repeated."""
    return (torch.arange(n) % period + 3).long()


def test_facts_of_a_tied_tiny_llama():
    model = tiny_llama(tied=True)
    facts = model_facts(model, "/models/my-tiny-llama/")
    params = sum(p.numel() for p in model.parameters())
    assert (facts.name, facts.vocab_size, facts.hidden_size, facts.n_blocks, facts.tied_head) == ("my-tiny-llama", VOCAB, 32, 2, True)
    assert facts.params == params and facts.embedding_params == VOCAB * 32
    assert facts.embedding_share == pytest.approx(VOCAB * 32 / params)


def test_untied_head_is_counted_once_more():
    tied, untied = model_facts(tiny_llama(True), "a"), model_facts(tiny_llama(False), "a")
    assert not untied.tied_head and untied.params == tied.params + VOCAB * 32


def test_display_names():
    assert display_name(None, "smollm2-135m") == "SmolLM2-135M"
    assert display_name(None, "gemma3-270m") == "Gemma-3-270M"
    assert display_name(None, "/x/gguf/Qwen2-0.5B.Q4_K_M.gguf") == "Qwen2-0.5B.Q4_K_M"
    assert display_name(None, "facebook/opt-125m") == "opt-125m"


def test_params_label_rounds_like_a_model_card():
    facts = model_facts(tiny_llama(), "x")
    assert facts.params_label == f"{facts.params / 1e6:.0f}M"
    big = type(facts)(**{**facts.__dict__, "params": 1_100_048_384})
    assert big.params_label == "1.1B"


def test_unigram_perplexity_of_uniform_and_constant_streams():
    # every token once over the whole vocabulary: counts 1, p = 2 / (2V) = 1/V, so perplexity V exactly
    assert unigram_perplexity(torch.arange(VOCAB), VOCAB) == pytest.approx(VOCAB)
    # one token repeated n times: p = (n + 1) / (n + V)
    n = 1000
    assert unigram_perplexity(torch.full((n,), 5), VOCAB) == pytest.approx((n + VOCAB) / (n + 1))
    with pytest.raises(ValueError, match="below vocab_size"):
        unigram_perplexity(torch.tensor([VOCAB]), VOCAB)


def test_random_weights_are_refused_with_a_pointer_to_tokenizer_bos_weights():
    model, ids = tiny_llama(), cyclic_stream()
    ppl = perplexity(model, ids, window=64, max_windows=8, progress=False)["ppl"]
    assert ppl > VOCAB / 10  # an untrained model predicts close to uniformly
    with pytest.raises(ValueError, match="tokenizer.*BOS.*weights"):
        check_baseline(ppl, VOCAB, unigram_perplexity(ids, VOCAB))


def test_unigram_bar_refuses_what_the_vocabulary_bar_lets_through():
    with pytest.raises(ValueError, match="unigram"):
        check_baseline(900.0, 49152, unigram_ppl=800.0)
    with pytest.raises(ValueError, match="perplexity nan"):
        check_baseline(math.nan, 49152)


def test_a_trained_tiny_lm_passes():
    model, ids = tiny_llama(), cyclic_stream()
    windows = lm_windows(ids, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(25):
        loss = model(input_ids=windows[step % len(windows)][None], labels=windows[step % len(windows)][None]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ppl = perplexity(model, ids, window=64, max_windows=8, progress=False)["ppl"]
    unigram = unigram_perplexity(ids, VOCAB)
    assert check_baseline(ppl, VOCAB, unigram) == ppl and ppl < 2.0 < unigram


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_facts_of_other_families(family):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D projections, n_layer / n_embd names, a tied head
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    facts = model_facts(model, f"/tmp/tiny-{family}")
    assert (facts.name, facts.vocab_size, facts.hidden_size, facts.n_blocks, facts.tied_head) == (f"tiny-{family}", VOCAB, 32, 3, True)
    assert facts.params == sum(p.numel() for p in model.parameters())


def test_short_name_drops_only_a_trailing_size():
    facts = model_facts(tiny_llama(), "x")
    short = {n: type(facts)(**{**facts.__dict__, "name": n}).short_name
             for n in ("SmolLM2-135M", "Gemma-3-270M", "Qwen2-0.5B", "tiny-gpt2", "opt-125m")}
    assert short == {"SmolLM2-135M": "SmolLM2", "Gemma-3-270M": "Gemma-3", "Qwen2-0.5B": "Qwen2", "tiny-gpt2": "tiny-gpt2",
                     "opt-125m": "opt"}


def test_small_vocabularies_are_judged_by_the_unigram_bar():
    assert check_baseline(140.0, 1024, unigram_ppl=300.0) == 140.0  # a weak tiny model beats token frequencies
    with pytest.raises(ValueError, match="a tenth of its 1024-token vocabulary"):
        check_baseline(140.0, 1024)  # without text statistics only the vocabulary bar is left
