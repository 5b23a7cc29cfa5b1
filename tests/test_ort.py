"""qlib.tools.onnx_utils on tiny random models: export fidelity, quantized sizes, the calibration reader, ORT perplexity, rotary."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from qlib.tools import onnx_utils as ou
from qlib.lab.eval import perplexity


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _bert_inputs(batch, seq, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, -pad:] = 0
        ids[-1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.fixture(scope="module")
def bert_onnx(bert, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    attempt = ou.try_export(bert, _bert_inputs(2, 16), path)
    assert attempt.ok, attempt.error
    return path


@pytest.fixture(scope="module")
def llama_onnx(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "llama.onnx"
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    attempt = ou.try_export(llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path, use_cache=False)
    assert attempt.ok, attempt.error
    return path


def test_dynamo_export_matches_pytorch_on_other_shapes(bert, bert_onnx):
    sess = ou.ort_session(bert_onnx, threads=1)
    inputs = _bert_inputs(3, 23, pad=5, seed=2)              # batch, length and padding unlike the traced example
    with torch.inference_mode():
        ref = bert(**inputs).logits.numpy()
    np.testing.assert_allclose(ou.ort_logits(sess, inputs), ref, atol=1e-4, rtol=1e-4)


def test_export_keeps_every_weight_once(bert, bert_onnx):
    weights = 4 * sum(p.numel() for p in bert.parameters())
    assert 0.95 * weights <= ou.initializer_bytes(bert_onnx) <= 1.02 * weights   # constant folding may drop a few
    assert ou.onnx_bytes(bert_onnx) >= ou.initializer_bytes(bert_onnx)
    assert ou.input_names(bert_onnx) == ["input_ids", "attention_mask", "token_type_ids"]


def test_inputs_must_be_a_prefix(bert, tmp_path):
    with pytest.raises(ValueError, match="prefix"):
        ou.export_onnx(bert, {"input_ids": torch.ones(1, 4, dtype=torch.long), "token_type_ids": torch.zeros(1, 4, dtype=torch.long)},
                       tmp_path / "x.onnx")


def test_quantize_dynamic_is_smaller_and_close(bert, bert_onnx, tmp_path):
    q = ou.quantize_dynamic_int8(bert_onnx, tmp_path / "bert.int8.onnx")
    assert ou.onnx_bytes(q) < ou.onnx_bytes(bert_onnx)
    assert ou.initializer_bytes(q) < 0.3 * ou.initializer_bytes(bert_onnx)   # MatMul and Gather weights: 4 bytes -> 1
    assert ou.op_counts(q).get("DynamicQuantizeLinear", 0) > 0
    inputs = _bert_inputs(2, 12, seed=3)
    ref = ou.ort_logits(ou.ort_session(bert_onnx, 1), inputs)
    out = ou.ort_logits(ou.ort_session(q, 1), inputs)
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max() + 0.05


class _SpaceTokenizer:
    """Whitespace tokenizer with the HF call signature the reader uses (ids = word lengths)."""

    def __call__(self, texts, padding=True, truncation=True, max_length=128, return_tensors="np"):
        rows = [[len(w) for w in t.split()][:max_length] for t in texts]
        width = max(len(r) for r in rows)
        ids = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
        mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_calibration_reader_yields_the_real_inputs():
    texts = ["a bb ccc", "dddd", "ee f ggg hh", "i"]
    reader = ou.TextCalibrationReader(_SpaceTokenizer(), texts, ["input_ids", "attention_mask"])
    batches = list(iter(reader.get_next, None))
    assert len(batches) == len(reader) == 4
    assert [b["input_ids"].tolist() for b in batches] == [[[1, 2, 3]], [[4]], [[2, 1, 3, 2]], [[1]]]
    assert all(set(b) == {"input_ids", "attention_mask"} and b["attention_mask"].all() for b in batches)  # no padding
    reader.rewind()
    assert reader.get_next()["input_ids"].tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="no calibration texts"):
        ou.TextCalibrationReader(_SpaceTokenizer(), [], ["input_ids"])


def test_quantize_static_qdq_calibrates_on_the_reader(bert_onnx, tmp_path):
    texts = ["a bb ccc dd", "dddd e", "ee f ggg hh", "i jj kkk"] * 2
    reader = ou.TextCalibrationReader(_SpaceTokenizer(), texts, ou.input_names(bert_onnx))
    q = ou.quantize_static_qdq(bert_onnx, tmp_path / "bert.qdq.onnx", reader, op_types=["MatMul", "Gather"])
    counts = ou.op_counts(q)
    assert counts.get("QuantizeLinear", 0) > 0 and counts.get("DequantizeLinear", 0) > 0
    assert reader.get_next() is None                          # the calibration consumed every sentence
    assert ou.initializer_bytes(q) < 0.4 * ou.initializer_bytes(bert_onnx)   # int8 weights + per-channel scales


def test_ort_perplexity_equals_pytorch(llama, llama_onnx):
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(4))
    ref = perplexity(llama, ids, window=64, max_windows=3, progress=False)
    got = ou.ort_perplexity(ou.ort_session(llama_onnx, 1), ids, window=64, max_windows=3)
    assert got["n_tokens_scored"] == ref["n_tokens_scored"] == 3 * 63
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)


def test_int4_unties_the_head_and_shrinks(llama_onnx, tmp_path):
    q = ou.quantize_int4(llama_onnx, tmp_path / "llama.int4.onnx", block_size=32)
    counts = ou.op_counts(q)
    assert counts["MatMulNBits"] == 2 * 7 + 1                  # 7 projections per layer + the (untied) lm_head
    assert counts.get("MatMul", 0) <= 2 * 2 + 1                # left: attention scores and values, the rotary angles
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(5))
    fp = ou.ort_perplexity(ou.ort_session(llama_onnx, 1), ids, window=64)["ppl"]
    q4 = ou.ort_perplexity(ou.ort_session(q, 1), ids, window=64)["ppl"]
    assert abs(q4 / fp - 1) < 0.05                              # a random tiny model barely notices 4-bit weights


def test_complex_rope_is_the_same_function(llama):
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        ref = llama(input_ids=ids, use_cache=False).logits
        for broadcast_first in (False, True):
            with ou.complex_rope(llama, broadcast_first=broadcast_first):
                out = llama(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(llama(input_ids=ids, use_cache=False).logits, ref)   # patch removed


def test_complex_rope_says_which_models_it_cannot_take(llama):
    import transformers as T

    assert ou.complex_rope_unsupported(llama) is None
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    reason = ou.complex_rope_unsupported(gpt2)
    assert isinstance(reason, str) and "GPT2LMHeadModel has no rotary position embedding" in reason
    with pytest.raises(TypeError, match="no rotary position embedding"):
        with ou.complex_rope(gpt2):
            pass


def test_legacy_exporter_cannot_export_polar(llama, tmp_path):
    ids = torch.randint(0, 128, (1, 16))
    with ou.complex_rope(llama):
        attempt = ou.try_export(llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "c.onnx",
                                dynamo=False, use_cache=False)
    assert not attempt.ok and "aten::polar" in attempt.error and attempt.error.startswith("UnsupportedOperatorError")
    assert any(w["category"] == "DeprecationWarning" and "legacy" in w["message"] for w in attempt.warnings)


def test_error_summary_extracts_the_dynamo_root_cause():
    msg = ("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m\n\n## Exception summary\n\n"
           "<class 'torch.onnx._internal.exporter._errors.DispatchError'>: No ONNX function found for aten.unsqueeze\n⬆️\n"
           "<class 'torch.onnx._internal.exporter._errors.ConversionError'>: Error when translating node")
    assert ou.error_summary(RuntimeError(msg)) == "DispatchError: No ONNX function found for aten.unsqueeze"
