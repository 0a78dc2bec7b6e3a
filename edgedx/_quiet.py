"""Keep the native libraries' own log lines off the terminal (TensorFlow-free).

TensorFlow, its TFLite converter and LiteRT write from C++ straight to file descriptor 2: oneDNN
and CUDA notices when TensorFlow loads, "fully_quantize: 0, inference_type: 6, ..." for every int8
conversion, "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." for every interpreter.
Python's logging and ``TF_CPP_MIN_LOG_LEVEL`` do not reach all of them, and a newcomer reads them
as errors. Around such calls, file descriptor 2 is captured and replayed without the lines that
match these libraries' formats, so nothing else written meanwhile is lost. ``EDGEDX_TF_LOGS=1``
(``edgedx --verbose``) leaves everything as it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

VERBOSE_ENV = "EDGEDX_TF_LOGS"
_SWAP = threading.RLock()
_NATIVE_LINE = re.compile(
    r"^(?:[IWE]\d{4} [\d:. ]+\d+ \w+\.cc:\d+\]"  # absl: I0000 00:00:1795... 12345 port.cc:153] ...
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|INFO: Created TensorFlow Lite .*delegate"
    r"|fully_quantize: \d+, inference_type: \d+"
    r")"
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def is_native_log_line(line: str) -> bool:
    return bool(_NATIVE_LINE.match(line))


@contextlib.contextmanager
def native_logs_hidden() -> Iterator[None]:
    """Run the body with the native libraries' log lines on file descriptor 2 dropped."""
    if verbose():
        yield
        return
    with _SWAP, tempfile.TemporaryFile() as captured:  # one swap of the process's fd 2 at a time
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not is_native_log_line(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
