"""Keeping library chatter off the console unless ``--verbose``.

At start-up DeepSpeed logs warnings that say nothing about the run (a learning rate asked for before
the first step, once per rank), prints its layer seeds, topology and stage listing on rank 0, and torch
warns that collectives DeepSpeed still calls are deprecated. None of it is an error. Real errors still
reach the console: every exception propagates as before, and the silenced loggers keep ERROR.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

log = logging.getLogger(__name__)

# library loggers whose INFO and WARNING records are start-up chatter in a training run
_CHATTY_LOGGERS = ("DeepSpeed", "torch.distributed", "ray", "ray.train")


def quiet_libraries(verbose: bool) -> None:
    """In this trainer process, unless ``verbose``: the libraries' loggers at ERROR and torch's deprecation
    warnings about collectives off. Call it after ``DS_ACCELERATOR`` is set (it imports DeepSpeed)."""
    if verbose:
        return
    # DeepSpeed sets its logger's level when the logger is created, on first import: create it first
    import deepspeed.utils.logging  # noqa: F401

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@contextlib.contextmanager
def library_prints(verbose: bool) -> Iterator[None]:
    """Around a library call that prints progress to stdout (DeepSpeed building a pipeline): unless
    ``verbose``, what it prints goes to this module's debug log instead. Only stdout, only inside the
    block: stderr, warnings and exceptions pass as they are."""
    if verbose:
        yield
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        if out.getvalue().strip():
            log.debug("library output:\n%s", out.getvalue().rstrip())
