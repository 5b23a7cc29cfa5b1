"""Tests for qlib.lab.eval: perplexity protocol, KL / top-1, classification metrics, SQNR."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qlib.lab import eval as qeval
from qlib.quant.primitives import sqnr_db

torch.set_num_threads(1)


class ConstantLM(nn.Module):
    """A causal 'LM' that predicts the same distribution at every position; outputs look like HF's (``.logits``)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("const", logits.float())

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.const.expand(b, t, -1).clone())


class EmbedLM(nn.Module):
    """A tiny bigram LM (embedding -> linear) whose logits depend on the input token."""

    def __init__(self, vocab: int, dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input_ids))


def test_lm_windows_count_and_content():
    ids = torch.arange(1000)
    w = qeval.lm_windows(ids, window=64)
    assert w.shape == (1000 // 64, 64)
    assert torch.equal(w.reshape(-1), ids[: 15 * 64])  # non-overlapping, remainder dropped
    assert qeval.lm_windows(ids, window=64, max_windows=3).shape == (3, 64)
    assert qeval.lm_windows(ids, window=64, max_windows=100).shape == (15, 64)
    with pytest.raises(ValueError, match="fewer than one window"):
        qeval.lm_windows(torch.arange(10), window=64)


def test_perplexity_uniform_predictor_equals_vocab_size():
    vocab = 37
    model = ConstantLM(torch.zeros(vocab))
    ids = torch.randint(0, vocab, (10 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    res = qeval.perplexity(model, ids, window=16, progress=False)
    assert res["ppl"] == pytest.approx(vocab, rel=1e-5)
    assert res["n_windows"] == 10
    assert res["n_tokens_scored"] == 10 * 15  # first token of each window is not predicted
    assert res["window"] == 16


def test_perplexity_of_fixed_distribution_is_exp_entropy():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    model = ConstantLM(p.log())
    g = torch.Generator().manual_seed(1)
    body = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])  # the scored tokens of each window have exactly frequencies p
    windows = [torch.cat([torch.tensor([3]), body[torch.randperm(8, generator=g)]]) for _ in range(6)]
    ids = torch.cat(windows)
    res = qeval.perplexity(model, ids, window=9, batch_size=4, progress=False)
    entropy = -(p * p.log()).sum().item()
    assert res["ppl"] == pytest.approx(math.exp(entropy), rel=1e-5)  # 2 ** 1.75
    assert res["nll"] == pytest.approx(entropy, rel=1e-5)


def test_perplexity_windows_are_independent_and_batching_does_not_matter():
    vocab = 23
    model = EmbedLM(vocab)
    ids = torch.randint(0, vocab, (7 * 12,), generator=torch.Generator().manual_seed(2))
    a = qeval.perplexity(model, ids, window=12, batch_size=1, progress=False)
    b = qeval.perplexity(model, ids, window=12, batch_size=3, progress=False)
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    # by hand: mean over every window's positions 1.. of -log softmax(logits)[target]
    logp = torch.log_softmax(model(ids.view(7, 12)), -1)[:, :-1]
    nll = -logp.gather(-1, ids.view(7, 12)[:, 1:, None]).mean().item()
    assert a["nll"] == pytest.approx(nll, rel=1e-5)
    c = qeval.perplexity(model, ids, window=12, max_windows=2, progress=False)
    assert c["n_windows"] == 2 and c["n_tokens_scored"] == 22


def test_tokenize_text_adds_only_leading_bos():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert qeval.tokenize_text(plain, "hello world hello").tolist() == [3, 4, 3]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = qeval.tokenize_text(with_bos, "hello world hello")
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 3, 4, 3]  # one BOS, no EOS


def test_kl_top1_identical_and_by_hand():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(3))
    same = qeval.kl_top1(logits, logits.clone())
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    ref = torch.tensor([[2.0, 0.0, 0.0]])
    test = torch.tensor([[0.0, 1.0, 0.0]])
    p, q = torch.softmax(ref, -1)[0], torch.softmax(test, -1)[0]
    expected = (p * (p / q).log()).sum().item()
    res = qeval.kl_top1(ref, test)
    assert res["kl"] == pytest.approx(expected, rel=1e-6)
    assert res["top1_agreement"] == 0.0
    with pytest.raises(ValueError, match="vocabulary"):
        qeval.kl_top1(ref, torch.zeros(1, 4))


def test_logit_agreement_equals_kl_top1_on_concatenated_logits():
    vocab = 19
    ref, model = EmbedLM(vocab, seed=0), EmbedLM(vocab, seed=0)
    with torch.no_grad():
        model.head.weight.add_(0.5 * torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(4)))
    windows = torch.randint(0, vocab, (5, 10), generator=torch.Generator().manual_seed(5))
    streamed = qeval.logit_agreement(ref, model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        direct = qeval.kl_top1(ref(windows), model(windows))
    assert streamed["kl"] == pytest.approx(direct["kl"], rel=1e-5)
    assert streamed["top1_agreement"] == pytest.approx(direct["top1_agreement"])
    assert streamed["n_positions"] == 50
    assert 0.0 < streamed["kl"] and streamed["top1_agreement"] < 1.0


def test_accuracy_and_f1_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    assert qeval.accuracy(p, t) == pytest.approx(accuracy_score(t, p))
    assert qeval.f1(p, t) == pytest.approx(f1_score(t, p))
    assert qeval.f1(torch.tensor(p), list(t)) == pytest.approx(f1_score(t, p))
    t3, p3 = rng.integers(0, 4, 500), rng.integers(0, 3, 500)  # class 3 never predicted
    assert qeval.f1(p3, t3, average="macro") == pytest.approx(f1_score(t3, p3, average="macro"))
    assert qeval.accuracy(p3, t3) == pytest.approx(accuracy_score(t3, p3))
    with pytest.raises(ValueError, match="macro"):
        qeval.f1(p3, t3)
    with pytest.raises(ValueError, match="one prediction per target"):
        qeval.accuracy([1, 0], [1])


def test_sqnr_known_noise_and_equal():
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(200_000, generator=g)  # power ~1
    noise = 0.1 * torch.randn(200_000, generator=g)  # power ~0.01
    assert sqnr_db(ref, ref + noise) == pytest.approx(20.0, abs=0.1)
    assert sqnr_db(ref, ref.clone()) == math.inf
    exact = torch.ones(100)
    assert sqnr_db(exact, exact * 1.1) == pytest.approx(20.0, abs=1e-5)  # noise power 0.01 (up to fp32 rounding of 1.1)


def test_layer_sqnr_finds_the_perturbed_layer():
    torch.manual_seed(7)
    ref = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    last = copy.deepcopy(ref)
    with torch.no_grad():
        last[4].weight.add_(0.01 * torch.randn_like(last[4].weight))
    res = qeval.layer_sqnr(ref, last, x)
    assert list(res) == ["0", "2", "4"]
    assert res["0"] == math.inf and res["2"] == math.inf
    assert math.isfinite(res["4"]) and res["4"] > 10  # small noise: high but finite SQNR
    middle = copy.deepcopy(ref)
    with torch.no_grad():
        middle[2].bias.add_(0.1)
    res = qeval.layer_sqnr(ref, middle, {"input": x})
    assert res["0"] == math.inf and math.isfinite(res["2"]) and math.isfinite(res["4"])  # error propagates downstream


def test_classify_images_and_texts():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    images = torch.randn(70, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    pred = qeval.classify_images(model, images, batch_size=16, progress=False)
    with torch.no_grad():
        expected = model(images).argmax(-1).numpy()
    assert pred.dtype == np.int64 and np.array_equal(pred, expected)

    class Tok:
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            ids = torch.tensor([[len(t) % 3, len(t.split()) % 3] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(3, 2)

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=self.emb(input_ids).sum(1))

    clf, texts = Clf(), ["a b", "hello", "x y z w", "q"] * 5
    out = qeval.classify_texts(clf, Tok(), texts, batch_size=3, progress=False)
    with torch.no_grad():
        expected = clf(**Tok()(texts, True, True, 128, "pt")).logits.argmax(-1).numpy()
    assert np.array_equal(out, expected) and len(out) == 20


def test_perplexity_matches_hf_loss_on_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(9)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (4 * 32 + 7,))
    res = qeval.perplexity(model, ids, window=32, batch_size=2, progress=False)
    with torch.no_grad():  # the GPTQ paper's way: mean of each window's HF loss
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in qeval.lm_windows(ids, 32)]
    assert res["nll"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert res["n_windows"] == 4


def _tiny_llama_and_perturbed():
    from test_arch import tiny_llama

    ref, model = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(8)))
    return ref, model


def test_evaluate_lm_equals_perplexity_and_kl_top1_on_tiny_llama():
    ref, model = _tiny_llama_and_perturbed()
    g = torch.Generator().manual_seed(6)
    ids = {"a": torch.randint(0, 97, (3 * 16 + 5,), generator=g), "b": torch.randint(0, 97, (2 * 16,), generator=g)}
    windows = {d: qeval.lm_windows(x, 16) for d, x in ids.items()}
    ref_logits = qeval.reference_logits(ref, {"a": windows["a"]})  # KL / top-1 on domain "a" only
    res = qeval.evaluate_lm(model, windows, ref_logits)
    for d, x in ids.items():  # bit-for-bit the same perplexity as the streaming function, one window per batch
        assert res[d].ppl == qeval.perplexity(model, x, 16, progress=False)["ppl"]
        assert res[d].n_tokens_scored == sum(res[d].window_tokens) == len(windows[d]) * 15
    with torch.no_grad():
        direct = qeval.kl_top1(ref(windows["a"]).logits, model(windows["a"]).logits)
    assert res["a"].kl == pytest.approx(direct["kl"], rel=1e-5) and res["a"].kl > 0
    assert res["a"].top1 == direct["top1_agreement"] < 1.0
    assert res["b"].kl is None and res["b"].top1 is None and res["b"].window_kl is None
    assert sum(res["a"].window_top1) == round(direct["top1_agreement"] * direct["n_positions"])
    assert math.exp(sum(res["a"].window_nll) / sum(res["a"].window_tokens)) == pytest.approx(res["a"].ppl, rel=1e-12)


def test_evaluate_lm_against_itself_and_through_a_callable():
    ref, model = _tiny_llama_and_perturbed()
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(7))
    own = qeval.evaluate_lm(ref, windows, qeval.reference_logits(ref, windows))
    assert own.kl == pytest.approx(0.0, abs=1e-6) and own.top1 == 1.0
    ref_logits = qeval.reference_logits(ref, windows)
    as_module = qeval.evaluate_lm(model, windows, ref_logits)
    as_numpy_callable = qeval.evaluate_lm(lambda x: model(x).logits.numpy(), windows, ref_logits)  # like ort_logits
    assert as_numpy_callable == as_module


def test_evaluate_lm_rejects_mismatched_reference():
    ref, model = _tiny_llama_and_perturbed()
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="reference_logits"):
        qeval.evaluate_lm(model, windows, qeval.reference_logits(ref, windows[:2]))
    with pytest.raises(ValueError, match="no windows"):
        qeval.evaluate_lm(model, {"a": windows}, {"b": qeval.reference_logits(ref, windows)})
    with pytest.raises(ValueError, match="lm_windows"):
        qeval.evaluate_lm(model, windows.flatten())
