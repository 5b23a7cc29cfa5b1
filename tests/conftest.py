import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(_k, _v)
