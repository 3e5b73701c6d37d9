import os

# Tests use one intra-op thread per process: 2 cores are shared by multi-rank tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton kernels run without a GPU only under the interpreter, set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
