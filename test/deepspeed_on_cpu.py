"""Run a script with accelerate's DeepSpeed set up on CPU processes (test_trainer.py's DeepSpeed tests:
`make venv` installs deepspeed, and they skip where it is not installed; not collected by pytest).

    accelerate launch --config_file training/accelerate/deepspeed_zero2.yaml --num_processes 2 \
        test/deepspeed_on_cpu.py test/ddp_lens_train.py OUTPUT_DIR use_cpu=false ...

accelerate 1.15 initialises DeepSpeed's communication only for processes that are not told use_cpu
(with use_cpu it drops DeepSpeed and trains as DDP), and a process that is not told so and has no GPU
gets no backend: its state says one process (DistributedType.NO) while DeepSpeed's communication sees
all of them, and DeepSpeed then refuses the batch sizes transformers computed ("train_batch_size is not
equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2"). This gives such a
process gloo, as accelerate does for its CPU processes; DeepSpeed's engine, ZeRO and checkpointing are
then its own.
"""

import os
import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_prepare_backend = state.PartialState._prepare_backend


def _gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    found, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    if found is None and not cpu and launched and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return "gloo", DistributedType.MULTI_CPU
    return found, distributed_type


state.PartialState._prepare_backend = _gloo_for_deepspeed
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
