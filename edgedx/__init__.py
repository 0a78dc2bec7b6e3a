"""edgedx: put medical-imaging CNNs onto scanner-side hardware.

The base install is TensorFlow-free: :mod:`edgedx.preprocess`, :mod:`edgedx.bundle`,
:mod:`edgedx.data` and :mod:`edgedx.runtime`. Training and compression live behind the
``[train]`` extra.
"""

__version__ = "0.1.0"
