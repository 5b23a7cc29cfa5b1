"""Tests for qlib.methods.lstm: the textgenrnn conversion against the Keras cell, dynamic INT8 of LSTMs, hidden-state error,
weight fake-quant and the detector's windowed scoring."""
import numpy as np
import pytest
import torch
from torch import nn

from qlib.methods import lstm


def _cudnn_weights(rng: np.random.Generator, n_in: int, hidden: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random weights in the layout a Keras CuDNNLSTM stores: kernel [in, 4H], recurrent [H, 4H], bias [8H]."""
    return (rng.standard_normal((n_in, 4 * hidden)) * 0.5, rng.standard_normal((hidden, 4 * hidden)) * 0.5,
            rng.standard_normal(8 * hidden) * 0.3)


def _torch_lstm(n_in: int, hidden: int, params: dict[str, torch.Tensor]) -> nn.LSTM:
    m = nn.LSTM(n_in, hidden, batch_first=True)
    m.load_state_dict(params)
    return m.eval()


@pytest.mark.parametrize("n_in,hidden", [(5, 3), (7, 7), (3, 6)])
def test_cudnn_conversion_equals_the_numpy_keras_cell(n_in: int, hidden: int) -> None:
    rng = np.random.default_rng(0)
    kernel, recurrent, bias = _cudnn_weights(rng, n_in, hidden)
    x = rng.standard_normal((2, 9, n_in))
    ref = lstm.keras_lstm_numpy(x, *lstm.keras_cudnn_to_lstm(kernel, recurrent, bias))  # Keras' own conversion
    with torch.inference_mode():
        ours = _torch_lstm(n_in, hidden, lstm.cudnn_to_torch(kernel, recurrent, bias))(torch.tensor(x, dtype=torch.float32))[0]
    np.testing.assert_allclose(ours.numpy(), ref, atol=2e-5)
    if n_in != hidden:  # a plain transpose of each gate block is a different function (square blocks coincide)
        wrong = lstm.cudnn_to_torch(kernel, recurrent, bias)
        wrong["weight_ih_l0"] = torch.tensor(np.concatenate([b.T for b in np.hsplit(kernel, 4)]), dtype=torch.float32)
        with torch.inference_mode():
            bad = _torch_lstm(n_in, hidden, wrong)(torch.tensor(x, dtype=torch.float32))[0]
        assert np.abs(bad.numpy() - ref).max() > 1e-2


def test_textgenrnn_loads_and_predicts_english() -> None:
    model, vocab = lstm.load_char_lstm()
    assert 460_000 < sum(p.numel() for p in model.parameters()) < 466_000  # 463k parameters, as shipped
    w = lstm.textgenrnn_weights()
    x = np.random.default_rng(1).standard_normal((1, 6, 100))
    keras = lstm.keras_lstm_numpy(x, *lstm.keras_cudnn_to_lstm(w["rnn_1/kernel"], w["rnn_1/recurrent_kernel"], w["rnn_1/bias"]))
    with torch.inference_mode():
        ours = model.rnn1(torch.tensor(x, dtype=torch.float32))[0].numpy()
    np.testing.assert_allclose(ours, keras, atol=1e-4)
    texts = ["The movie is a delight from start to finish.", "It was the best of times, it was the worst of times."]
    cx, cy, info = lstm.char_examples(texts, vocab)
    assert info["n_targets"] == sum(len(t) + 1 for t in texts)  # every char plus the closing <s>
    assert (cx[:, :-1] == 0).all(dim=1)[0] and cx[0, -1] == vocab[lstm.META_TOKEN]  # left padding, then <s>
    ppl = lstm.char_perplexity(model, cx, cy)["ppl"]
    assert 1.5 < ppl < 15  # a working char model on English; the uniform guess is 465


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dynamic_int8_quantizes_a_bare_lstm_and_a_child_lstm() -> None:
    torch.manual_seed(0)
    bare = nn.LSTM(4, 8, batch_first=True).eval()
    skipped = torch.ao.quantization.quantize_dynamic(bare, {nn.LSTM}, dtype=torch.qint8)
    assert type(skipped) is nn.LSTM  # the pitfall: the root module is never swapped
    q = lstm.dynamic_int8(bare)
    assert isinstance(q, torch.ao.nn.quantized.dynamic.LSTM)
    det = lstm.ECGBiLSTM(hidden=8, layers=2).eval()
    qd = lstm.dynamic_int8(det)
    types = lstm.quantized_modules(qd)
    assert types["lstm"].endswith("dynamic.modules.rnn.LSTM") and types["head"].endswith("dynamic.modules.linear.Linear")
    assert isinstance(det.lstm, nn.LSTM)  # the original is untouched
    x = torch.randn(3, 20, 4)
    with torch.inference_mode():
        ref, out = bare(x)[0], q(x)[0]
    assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()  # quantized (not identical), and close


def test_hidden_state_error_on_a_toy() -> None:
    torch.manual_seed(0)
    ref = nn.LSTM(3, 5, batch_first=True).eval()
    x = torch.randn(1, 30, 3)
    same = lstm.hidden_state_error(ref, ref, x)
    assert np.all(same["accumulated"] == 0) and np.all(same["local"] == 0)
    test = nn.LSTM(3, 5, batch_first=True).eval()
    test.load_state_dict(ref.state_dict())
    with torch.no_grad():
        test.bias_ih_l0.add_(0.05)
    e = lstm.hidden_state_error(ref, test, x)
    with torch.inference_mode():
        full = (test(x)[0] - ref(x)[0])[0].norm(dim=-1).numpy()  # the two whole-sequence runs
        h, state = ref(x[:, :1])
        h2 = ref(x[:, 1:2], state)[0]
        local_2 = float((test(x[:, 1:2], state)[0] - h2).norm())
    np.testing.assert_allclose(e["accumulated"], full, rtol=1e-4, atol=1e-7)
    assert e["local"][0] == pytest.approx(e["accumulated"][0])  # step 1 starts from the same (zero) state
    assert e["local"][1] == pytest.approx(local_2, rel=1e-5)
    assert np.all(e["local"] > 0)
    np.testing.assert_allclose(e["ref_norm"][0], float(h.norm()), rtol=1e-6)


def test_loglog_slope_recovers_power_laws() -> None:
    t = np.arange(1, 501, dtype=float)
    assert lstm.loglog_slope(0.01 * t) == pytest.approx(1.0, abs=1e-6)
    assert lstm.loglog_slope(0.3 * np.sqrt(t)) == pytest.approx(0.5, abs=1e-6)
    assert lstm.loglog_slope(np.full(500, 0.2)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fake_quant_weights_puts_lstm_rows_on_the_grid(bits: int) -> None:
    torch.manual_seed(0)
    det = lstm.ECGBiLSTM(hidden=8, layers=2)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    fq = lstm.fake_quant_weights(det, bits)
    for k, v in det.state_dict().items():
        assert torch.equal(v, before[k])  # a copy: the original is not modified
    for name, w in fq.lstm.named_parameters():
        if name.startswith("bias"):
            assert torch.equal(w, getattr(det.lstm, name))  # biases stay FP32
            continue
        ref = getattr(det.lstm, name)
        for row, ref_row in zip(w, ref):
            assert len(torch.unique(row)) <= 2 ** bits
            scale = 2 * ref_row.abs().max() / (2 ** bits - 1)  # symmetric per-row scale
            assert (row - ref_row).abs().max() <= scale / 2 + 1e-6
    assert len(torch.unique(fq.head.weight)) <= 2 ** bits


def test_detector_scores_cover_every_point_once_per_stride() -> None:
    series = np.sin(np.arange(300) / 3.0).astype(np.float32)
    zeros = lambda x: np.zeros(x.shape[:2], dtype=np.float32)  # noqa: E731  predicts 0: the error is the value squared
    score = lstm.detector_scores(zeros, series, smooth=1)
    lo = (lstm.WINDOW - lstm.MASK) // 2
    covered = slice(lo, len(series) - lo - 8)  # points some window blanks (the last start is a multiple of the stride)
    np.testing.assert_allclose(score[covered], series[covered] ** 2, rtol=1e-6, atol=1e-7)
    smoothed = lstm.detector_scores(zeros, series, smooth=5)
    np.testing.assert_allclose(smoothed[100], np.mean(series[98:103] ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        lstm.detector_scores(zeros, series, stride=5)


def test_masked_windows_blank_the_centre() -> None:
    series = np.arange(200, dtype=np.float32)
    x = lstm.masked_windows(series, [0, 10])
    lo = (lstm.WINDOW - lstm.MASK) // 2
    assert x.shape == (2, lstm.WINDOW, 2)
    assert np.all(x[:, lo:lo + lstm.MASK, 0] == 0) and np.all(x[:, lo:lo + lstm.MASK, 1] == 1)
    assert np.all(x[1, :lo, 0] == np.arange(10, 10 + lo)) and np.all(x[:, :lo, 1] == 0)


def test_onnx_export_matches_pytorch(tmp_path) -> None:
    from qlib.tools.onnx_utils import op_counts, ort_session

    torch.manual_seed(0)
    det = lstm.ECGBiLSTM(hidden=8, layers=2).eval()
    x = torch.randn(3, lstm.WINDOW, 2)
    path = lstm.export_onnx(det, x[:2], tmp_path / "det.onnx")
    assert op_counts(path)["LSTM"] == 2  # one ONNX LSTM node per layer (both directions in one node)
    out = lstm.ort_predict(ort_session(path, threads=1))(x.numpy())  # another batch size: dynamic batch
    with torch.inference_mode():
        np.testing.assert_allclose(out, det(x).numpy(), atol=1e-5)


def test_timed_rounds_cpu_clock_leaves_out_waiting() -> None:
    import time

    fns = {"sleep": lambda: time.sleep(0.02)}
    wall = lstm.timed_rounds(fns, rounds=1, reps=2, warmup=0, clock="wall")["sleep"]
    cpu = lstm.timed_rounds(fns, rounds=1, reps=2, warmup=0, clock="cpu")["sleep"]
    assert wall >= 0.02 and cpu < 0.005  # a sleeping process waits without using the CPU
    with pytest.raises(ValueError, match="clock"):
        lstm.timed_rounds(fns, clock="gpu")


def test_average_precision_and_threshold_spread() -> None:
    labels = np.array([0, 0, 1, 1, 0, 0])
    assert lstm.average_precision(np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.0]), labels) == pytest.approx(1.0)
    assert lstm.average_precision(np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.0]), labels) < 0.5
