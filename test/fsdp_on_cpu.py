"""Run a script with accelerate's FSDP allowed on CPU processes (test_trainer.py's FSDP test; not
collected by pytest).

    accelerate launch --config_file training/accelerate/fsdp.yaml --num_processes 2 \
        test/fsdp_on_cpu.py test/ddp_lens_train.py OUTPUT_DIR use_cpu=true ...

accelerate 1.15's AcceleratorState enables FSDP only when the distributed type is a GPU-type one
(MULTI_GPU, MULTI_XPU, ...); on CPU processes (MULTI_CPU, gloo) it drops the FSDP plugin without a word
and the run trains as DDP. PyTorch's FSDP2 itself runs on gloo. This lifts exactly that gate: when the
plugin was given and the processes are MULTI_CPU, the state becomes FSDP with that plugin, as it would on
GPUs. Everything else (fully_shard, DTensor parameters, the full state dict gathered for saving, FSDP's
optimizer state) is torch's and accelerate's own code.
"""

import runpy
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _fsdp_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
