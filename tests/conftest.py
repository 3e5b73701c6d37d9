import os

# Tests use one intra-op thread per process: 2 cores are shared by multi-rank tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
