"""What quantization *is*: affine primitives, frozen configs, ``quantize_`` and its handler registry,
fake-quant modules, packed INT8/INT4 kernels with save/load, FP8 simulation, and the small ``nn.Module`` helpers
every layer shares (``modules``: replace a submodule, run a batch, take logits). Imports no other part of qlib."""
