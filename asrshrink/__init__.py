"""asrshrink: shrink pretrained speech-recognition transducers after training."""

import os as _os

# PyTorch's OpenMP threads spin while waiting; on a small shared CPU that makes LSTM steps many times slower
# whenever another process runs. Passive waiting must be chosen before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
