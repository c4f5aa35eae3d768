"""A quiet console: nothing printed that a user cannot act on.

Noise is filtered by its source, the logger that emits it, so a new release that rewords a line stays filtered:

* ``kernels`` (pulled in by transformers): bitsandbytes asks it, on import, for an optional accelerated CPU
  kernel from the Hugging Face Hub; offline it warns that it skips the publisher trust check, and the kernel is
  never fetched. Nothing it says here is actionable: its loggers show errors only.
* ``bitsandbytes.backends.cpu.ops``: the same optional kernel's absence, on every run, quantised or not: errors only.
* Lightning's rank-zero and seed loggers: the seed, the accelerators it did not find and a cloud-logging advert,
  on every run. These loggers also say things that matter (checkpoints restored, why a fit stopped), so only
  those lines are dropped.
* Deprecation and future warnings raised inside other packages (torch's own modules using its deprecated
  ``torch.jit.script_method`` on import, Lightning's ``_pytree``): addressed to those packages' authors. A
  deprecated call the project makes is attributed to the project's module, and still shows.
* transformers' "Loading weights" bar, drawn inside the trainer's output.

``tests/test_progress.py`` holds a fit's console to the project's own line forms, so a third-party line that
none of this filters fails a test, whatever its wording.
"""

from __future__ import annotations

import logging
import warnings

# Sources with nothing actionable to say on this project's paths: only their errors show.
_ERRORS_ONLY = ("kernels", "bitsandbytes.backends.cpu.ops")
# Sources that also say useful things: the lines dropped, by the fragment that identifies each.
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                      "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
_DROPPED_LIGHTNING_LINES = ("Seed set to", "GPU available:", "TPU available:", "litlogger", "HPU available:")


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in _DROPPED_LIGHTNING_LINES)


def quiet_console() -> None:
    """Install the filters (idempotent); called before the heavy imports, some of which warn as they load."""
    for name in _ERRORS_ONLY:
        logging.getLogger(name).setLevel(logging.ERROR)  # children without a level of their own inherit it
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningNoise) for f in logger.filters):
            logger.addFilter(_DropLightningNoise())
        for handler in logger.handlers:  # records logged to a parent but printed by this logger's handler
            if not any(isinstance(f, _DropLightningNoise) for f in handler.filters):
                handler.addFilter(_DropLightningNoise())
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!lit_sftrl\b)")  # any module but ours
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
