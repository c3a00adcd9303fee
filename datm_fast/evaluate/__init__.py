"""Evaluation of distilled sets, DATM's protocol, fast: train fresh networks on a set, test them.

* :func:`evaluate_synset` trains ``config.runs`` networks on images + labels (class indices or logit
  labels) with the set's lr and returns an :class:`EvalResult` (per-run test accuracies, mean ± std);
  :func:`evaluate_models` does it for a cross-architecture pool (:data:`EVAL_POOLS`).
* :func:`evaluate_run_dir` evaluates a run directory (``images_best.pt``, ``labels_best.pt``,
  ``lr_best.pt``) on the data its ``run.json`` records (:func:`run_dataset`); :func:`load_synset`
  reads upstream-format files.
* :func:`random_real_baseline` and :func:`whole_dataset_baseline`: the same protocol on real data.
* Every function that trains several runs takes ``distributed=`` (a
  :class:`~datm_fast.distributed.Distributed`, default one process): the runs are shared out over the
  ranks with the seeds one process gives them, and every rank returns the whole result in run order
  (``torchrun ... -m datm_fast.cli eval`` does this; rank 0 alone writes).
* :class:`EvalConfig` holds the protocol (upstream's defaults) and how to run it: networks without
  batch norm train several runs at once on a GPU (``torch.func.vmap`` over stacked parameters),
  long CPU runs are compiled, everything stays on the device, and every random draw comes from an
  explicit ``torch.Generator``.

Example::

    import torch
    from datm_fast.data import load_dataset, preprocess
    from datm_fast.evaluate import EvalConfig, evaluate_synset, random_real_baseline

    ds, _ = preprocess(load_dataset("cifar10", root="../shared/data"), "zca")
    g = torch.Generator().manual_seed(0)
    print(random_real_baseline(ds, 10, EvalConfig(runs=5), generator=g, device="cuda").format())
    res = evaluate_synset(images, labels, lr, ds.test_images, ds.test_labels, EvalConfig(), generator=g)

Importing this package starts no device and reads no file.
"""

from ..distill.rundir import SyntheticSet, load_synset
from .baselines import (
    BASELINE_LR,
    evaluate_against_random_real,
    evaluator_on_test_set,
    random_real_baseline,
    random_real_subset,
    whole_dataset_baseline,
)
from .config import EVAL_POOLS, EvalConfig, EvalResult, resolve_models
from .losses import train_loss
from .protocol import check_lr, evaluate_models, evaluate_synset
from .results import environment, format_table, write_results
from .rundir import evaluate_run_dir, run_dataset

__all__ = [
    "BASELINE_LR",
    "EVAL_POOLS",
    "EvalConfig",
    "EvalResult",
    "SyntheticSet",
    "check_lr",
    "environment",
    "evaluate_models",
    "evaluate_against_random_real",
    "evaluate_run_dir",
    "evaluate_synset",
    "evaluator_on_test_set",
    "format_table",
    "load_synset",
    "random_real_baseline",
    "random_real_subset",
    "resolve_models",
    "run_dataset",
    "train_loss",
    "whole_dataset_baseline",
    "write_results",
]
