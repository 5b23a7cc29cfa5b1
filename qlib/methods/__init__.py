"""How models get quantized: the architecture table, calibration capture, GPTQ, AWQ, QAT, mixed precision,
CNN folding, recurrent models. Each method registers its own ``quantize_`` handler. Builds on ``qlib.quant``
(and ``qlib.lab``'s data and evaluation helpers)."""
