"""Glue between Snakemake's ``script:`` directive and the library: logging, errors, threads.

Each script under ``scripts/`` is ``run_logged(snakemake, function, **arguments)`` and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback


def set_torch_threads(threads: int) -> None:
    """Use exactly ``threads`` CPU threads; the workflow gives each job its own share of the cores.

    Torch-free unless torch is already imported: the table and figure rules run without it. The environment
    variables cover libraries that read them at import (a torch imported later by the job's function).
    """
    threads = max(1, int(threads))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def run_logged(smk, function, **kwargs):
    """Call ``function(**kwargs)`` with logging, stdout and stderr (tqdm, warnings) sent to ``smk.log[0]``.

    An exception is written to the log with its traceback and re-raised, so the job fails with the log naming
    the problem (a ``SegsynthError`` message names the file or config key).
    """
    set_torch_threads(smk.threads)
    with open(smk.log[0], "a", buffering=1) as log_file, contextlib.redirect_stderr(log_file), \
            contextlib.redirect_stdout(log_file):
        handler = logging.StreamHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        began = time.time()
        try:
            result = function(**kwargs)
            logging.getLogger(__name__).info("%s finished in %.1f s", function.__name__, time.time() - began)
            return result
        except Exception as err:
            traceback.print_exc(file=log_file)
            print(f"segsynth: {type(err).__name__}: {err}", file=sys.__stderr__)
            raise
        finally:
            root.removeHandler(handler)
