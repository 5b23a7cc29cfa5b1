import os

import qlib  # noqa: F401  importing qlib sets the lab's offline environment (qlib.OFFLINE_ENV)

os.environ.setdefault("MPLBACKEND", "Agg")  # figures in tests are files, never windows
