"""lens-train under a distributed launcher, instrumented (run by test_trainer.py's DDP test, not
collected by pytest).

    accelerate launch --config_file training/accelerate/ddp.yaml --num_processes 2 \
        test/ddp_lens_train.py OUTPUT_DIR [key=value ...]       (or torchrun --nproc_per_node 2 ...)

Runs ``lens_ros.training.cli.train_main`` on the tiny smoke recipe with ``use_cpu=true`` (gloo).
After every optimiser step each rank hashes the parameters the trainer optimises and the hashes of
all ranks are gathered; every checkpoint write is recorded with its rank; each rank's training rows
are recorded, and so is how train_main returned (its exit code, whether it left the process group).
Everything goes to OUTPUT_DIR/check/rank<N>.jsonl.
"""

import contextlib
import hashlib
import json
import os
import sys

import torch.distributed as dist
from transformers import TrainerCallback

from lens_ros.training import cli
from lens_ros.training import trainer as training

OUT = sys.argv[1]
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
LOG = os.path.join(OUT, "check")
os.makedirs(LOG, exist_ok=True)


def record(entry: dict) -> None:
    with open(os.path.join(LOG, f"rank{RANK}.jsonl"), "a") as log:
        log.write(json.dumps(entry) + "\n")


def digest(named) -> str:
    """A hash of the whole tensors: sharded ones (FSDP2's DTensors, ZeRO-3's partitions) are gathered
    first (collectives: every rank walks the same parameters in the same order)."""
    named = list(named)
    partitioned = [tensor for _, tensor in named if hasattr(tensor, "ds_id")]
    h = hashlib.sha256()
    with whole_partitions(partitioned):
        for name, tensor in named:
            tensor = tensor.detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            h.update(name.encode())
            h.update(tensor.float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def whole_partitions(params):
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


class SameOnAllRanks(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        mine = digest([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        every = [None] * WORLD
        dist.all_gather_object(every, mine)
        record({"step": state.global_step, "trainable_sha": mine, "all_ranks": every,
                "distributed": str(self.trainer.accelerator.distributed_type),
                "sharded": training.sharded(self.trainer.model)})


build, write, generate = training.build_trainer, training._write_checkpoint, \
    training.LensGRPOTrainer._generate_and_score_completions


def build_and_watch(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(SameOnAllRanks(trainer))
    return trainer


def write_and_record(lens, processor, args, output_dir, **kwargs):
    record({"checkpoint_write": str(output_dir)})
    return write(lens, processor, args, output_dir, **kwargs)


def generate_and_record(self, inputs):
    record({"sample_ids": [int(row["sample_id"]) for row in inputs]})
    return generate(self, inputs)


training.build_trainer, training._write_checkpoint = build_and_watch, write_and_record
training.LensGRPOTrainer._generate_and_score_completions = generate_and_record
overrides = [f"output_dir={OUT}", "use_cpu=true", *sys.argv[2:]]
code = cli.train_main(["--recipe", "training/tiny_smoke.yaml", *[x for o in overrides for x in ("--set", o)]])
record({"exit": code, "process_group_left": not dist.is_initialized()})
sys.exit(code)
