"""Datasets for datm_fast: loaders, the decoded-pixel cache, long-tailed variants and preprocessing.

Typical use::

    from datm_fast.data import load_dataset, long_tailed, preprocess

    ds = load_dataset("cifar10", root="/work/shared/data")   # float32 (N, 3, 32, 32) in [0, 1], cached
    ds_lt = long_tailed(ds, 100, seed=0)                      # CIFAR-10-LT, train split only
    zca_ds, zca = preprocess(ds, "zca")                       # DATM's ZCA (eps 0.1), fitted on train
    pixels = zca.inverse(zca_ds.train_images[:10])            # back to [0, 1] space for viewing

Modules: ``spec`` (:class:`DataSpec`, the record of which data a run used, and ``.load()`` to rebuild
them), ``loading`` (names, paths, ``load_dataset``), ``_layouts`` (the on-disk formats), ``cache``
(fingerprints, cached arrays), ``longtail``, ``subset``, ``transforms``. Importing this package reads no files
and starts nothing.
"""

from ._dataset import DatasetError, ImageDataset
from ._layouts import LAYOUTS, MEDMNIST_CLASSES
from .loading import DATASET_NAMES, load_dataset, resolve_source
from .longtail import long_tail_counts, long_tailed
from .spec import DataSpec
from .subset import subset_dataset
from .transforms import TRANSFORMS, Identity, Normalize, Transform, ZCAWhitening, preprocess

__all__ = [
    "DATASET_NAMES",
    "DataSpec",
    "LAYOUTS",
    "MEDMNIST_CLASSES",
    "TRANSFORMS",
    "DatasetError",
    "Identity",
    "ImageDataset",
    "Normalize",
    "Transform",
    "ZCAWhitening",
    "load_dataset",
    "long_tail_counts",
    "long_tailed",
    "preprocess",
    "resolve_source",
    "subset_dataset",
]
