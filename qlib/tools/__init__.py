"""Around the lab: reference-library wrappers (gptqmodel, llm-compressor), notebook 10's library recipes,
ONNX export and ONNX Runtime utilities, the environment doctor. Nothing in qlib depends on this package."""
