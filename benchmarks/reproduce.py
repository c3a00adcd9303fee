"""Reproduce DATM's CIFAR-10 results at a named budget: the script form of ``datm-fast reproduce``.

    python benchmarks/reproduce.py --preset short [--data-root ../shared/data] [--out runs/reproduce-short]
    python benchmarks/reproduce.py --preset tiny --device cpu      # a one-minute smoke test
    python benchmarks/reproduce.py --preset paper --ipcs 1,10,50   # the paper's protocol at some IPCs

Presets (``datm_fast.reproduce.PRESETS``): ``tiny`` (a CI smoke test on a 500-image subset), ``short``
(20 experts x 30 epochs, 2000 iterations, 5 evaluation runs at IPC 10) and ``paper`` (100 experts x 50
epochs, the shipped configs at IPC 1/10/50/500/1000, 5 runs of 1000 epochs, the whole train split).
Prints the table against the paper's figures and writes ``results.md`` and ``results.json`` in the
output directory; a second run with the same ``--out`` resumes. All the work is done by
:func:`datm_fast.reproduce.run_reproduce`; this file only parses the same options.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from datm_fast.reproduce import main
except ImportError:  # run from a checkout without installing: the package is one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from datm_fast.reproduce import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/reproduce.py"))
