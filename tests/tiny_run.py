"""The tiny digits run that the fault and distributed tests start from: a config of 6 iterations and the
``datm-fast buffer`` arguments of its 2-expert buffer (seconds on a CPU)."""

TINY_YAML = """\
dataset: digits
ipc: 1
syn_steps: 5
expert_epochs: 2
min_start_epoch: 0
current_max_start_epoch: 2
max_start_epoch: 4
iterations: 6
eval_it: 3
num_eval: 1
epoch_eval_train: 20
lr_img: 100
lr_teacher: 0.01
lr_lr: 1.0e-05
lr_y: 2.0
threshold: 10
zca: false
pix_init: real
checkpoint_every: 2
device: cpu
"""

BUFFER_ARGS = ["--dataset", "digits", "--experts", "2", "--epochs", "6", "--optimizer", "sgd"]
BUFFER_ARGS += ["--max-train-images", "400", "--max-test-images", "100", "--device", "cpu", "--no-progress"]
