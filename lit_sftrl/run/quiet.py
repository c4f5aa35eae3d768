"""A quiet console: nothing printed that a user cannot act on.

Lightning announces the seed, the accelerators it did not find and a cloud-logging advert on every run; a
deprecation inside Lightning's own ``_pytree`` warns on every fit; transformers draws a "Loading weights" bar
inside the trainer's output; bitsandbytes, imported with peft, warns on CPUs with AVX-512 that an optional
``kernels`` package for 4-bit matrix products is missing, on every run, quantised or not. None of it is
actionable here, so it is filtered at its source (named loggers, exact warning messages); every other warning
and log line still shows.
"""

from __future__ import annotations

import logging
import warnings

_DROPPED_LOG_LINES = ("Seed set to", "GPU available:", "TPU available:", "litlogger", "HPU available:",
                      "gemm_4bit_forward from kernels-community")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in _DROPPED_LOG_LINES)


def quiet_console() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
        for handler in logger.handlers:  # records logged to a parent but printed by this logger's handler
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
