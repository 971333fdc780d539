import os
import sys

import torch

# The shared test helpers live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
