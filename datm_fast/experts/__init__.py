"""Expert trajectories: train, store and read the expert buffers that trajectory matching distils from.

* Train: :class:`ExpertTrainer` trains K experts at once on one device (grouped convolutions over
  stacked flat parameters, data and DSA on the device), with plain SGD (MTT) or GSAM (FTD / DATM,
  :mod:`datm_fast.experts.gsam`). Each expert draws everything from its own seed, so training it in
  a group equals training it alone (to float rounding).
* Store: :func:`build_buffer` writes one safetensors file per expert (every epoch's flat parameters,
  epoch 0 = initialisation) plus ``manifest.json`` (config, model spec, dataset fingerprint, per-epoch
  accuracies, checksums); crash-safe and resumable.
* Read: :meth:`ExpertBuffer.open` (native or upstream ``replay_buffer_<n>.pt``), then
  ``buffer.params(expert, epoch)`` reads one epoch memory-mapped, checksum-verified on first use.
  :func:`convert_upstream` converts upstream buffers.

Command line: ``datm-fast buffer`` (:func:`datm_fast.experts.cli.add_parser`).

Example::

    from datm_fast.data import DataSpec
    from datm_fast.experts import ExpertBuffer, ExpertConfig, build_buffer
    from datm_fast.models import convnet_spec_from_name

    data = DataSpec("cifar10", root="../shared/data", preprocessing="zca")
    ds, _ = data.load()
    spec = convnet_spec_from_name("ConvNet", ds.channels, ds.num_classes, ds.image_size)
    build_buffer("buffers/c10", ds, spec, ExpertConfig(epochs=50), num_experts=100, data_spec=data, progress=True)
    buf = ExpertBuffer.open("buffers/c10", spec=spec, dataset=ds)
    theta = buf.params(3, 20)           # (320010,)
"""

from .buffer import (
    BufferWriter,
    ExpertBuffer,
    ExpertBufferError,
    convert_upstream,
    dataset_info,
    expert_filename,
    infer_upstream_spec,
)
from .build import BuildSummary, build_buffer
from .config import OPTIMIZERS, ExpertConfig, expert_seed
from .gsam import gsam_direction, gsam_perturbation, gsam_step, sgd_step
from .train import EpochReport, ExpertTrainer, TrainedExpert

__all__ = [
    "OPTIMIZERS",
    "BufferWriter",
    "BuildSummary",
    "EpochReport",
    "ExpertBuffer",
    "ExpertBufferError",
    "ExpertConfig",
    "ExpertTrainer",
    "TrainedExpert",
    "build_buffer",
    "convert_upstream",
    "dataset_info",
    "expert_filename",
    "expert_seed",
    "gsam_direction",
    "gsam_perturbation",
    "gsam_step",
    "infer_upstream_spec",
    "sgd_step",
]
