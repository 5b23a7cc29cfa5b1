"""The experiment harness: paths, offline sources (fetch), data, the model zoo, evaluation, benchmarks,
results with provenance and claims, the machine a number came from, the papermill runner. Builds on ``qlib.quant`` at most."""
