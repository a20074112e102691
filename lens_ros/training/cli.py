"""``lens-train --recipe FILE [--set key=value ...]``: train LENS from a YAML recipe.

A recipe is one flat YAML mapping (see ``training/*.yaml``):

* ``model``: where training starts (``load_lens_model`` source: ``tiny``, a directory, ``OuyBin/LENS``);
* ``data``: one data spec or a list of them (concatenated), see ``lens_ros.training.specs``;
* ``allow_download``: let ``model`` come from the Hugging Face hub (default false);
* every other key is a ``LensTrainingConfig`` field (trl's ``GRPOConfig`` + LENS's own).

``--set key=value`` overrides a recipe key; the value is converted to the field's type
(``--set learning_rate=1e-5``, ``--set use_lora=true``, ``--set lora_target_modules=q_proj,v_proj``).
Unknown keys are an error that lists the known ones. User errors print one line and exit 2.

``--resume PATH|latest`` goes on from a ``checkpoint-N`` the run wrote (``latest``: the newest complete one
in ``output_dir``); it is transformers' ``resume_from_checkpoint`` (``--set resume_from_checkpoint=...``).
Keep the recipe and its overrides as they were: the starting ``model`` is the KL reference (and LoRA's base).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from lens_ros.training.specs import DataSpecError, load_data

EXIT_USAGE = 2
RECIPE_KEYS = {"model": str, "data": list, "allow_download": bool}
DEFAULT_MODEL = "tiny"


class RecipeError(ValueError):
    """A recipe, an override or a data spec a user can fix."""


# -- values ---------------------------------------------------------------------------------------
def _config_fields() -> dict[str, dataclasses.Field]:
    from lens_ros.training.trainer import LensTrainingConfig

    return {f.name: f for f in dataclasses.fields(LensTrainingConfig) if f.init}


def _field_types(name: str) -> list:
    """The types a field accepts, None left out (a union's members, or the type itself)."""
    from lens_ros.training.trainer import LensTrainingConfig

    kind = typing.get_type_hints(LensTrainingConfig).get(name, str)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return [k for k in typing.get_args(kind) if k is not type(None)] or [str]
    return [kind]


def _to_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise RecipeError(f"{name}: expected true or false, got {value!r}")


def coerce(name: str, value):
    """``value`` (from YAML or ``--set`` text) as the type of recipe key / config field ``name``."""
    import yaml

    kinds = [RECIPE_KEYS[name]] if name in RECIPE_KEYS else _field_types(name)
    origin = typing.get_origin(kinds[0]) or kinds[0]
    if value is None or (isinstance(value, str) and value.strip() in ("null", "~", "None")):  # "none" is a value
        return None
    try:
        if origin is bool:
            return _to_bool(name, value)
        if origin is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or float(number) != int(number):
                raise ValueError
            return int(number)
        if origin is float:  # YAML reads "3e-6" as a string
            return float(value)
        if origin is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
                value = parsed
            return [v.strip() if isinstance(v, str) else v for v in (value if isinstance(value, list) else [value])]
        if origin is dict and isinstance(value, str):
            return yaml.safe_load(value)
        if origin is str:
            return str(value)
    except (TypeError, ValueError, yaml.YAMLError):
        raise RecipeError(f"{name}: cannot read {value!r} as {getattr(origin, '__name__', origin)}") from None
    if isinstance(value, str):  # enums and other unions: a string when strings are accepted, else YAML's reading
        return value if str in kinds else yaml.safe_load(value)
    return value


def apply_overrides(recipe: dict, overrides: Sequence[str]) -> dict:
    """``recipe`` with each ``key=value`` of ``overrides`` applied (converted, checked)."""
    recipe = dict(recipe)
    known = set(RECIPE_KEYS) | set(_config_fields())
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--set wants key=value, got {item!r}")
        if key not in known:
            raise RecipeError(f"--set {key}: unknown key; known keys are {', '.join(sorted(known))}")
        recipe[key] = value
    return recipe


def read_recipe(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values")
    return recipe


def build_config(recipe: dict):
    """(LensTrainingConfig, model source, data specs, allow_download) from a recipe mapping."""
    from lens_ros.training.trainer import LensTrainingConfig

    fields = _config_fields()
    unknown = sorted(set(recipe) - set(fields) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)}; known keys are "
                          f"{', '.join(sorted(set(fields) | set(RECIPE_KEYS)))}")
    values = {key: coerce(key, value) for key, value in recipe.items()}
    data = values.pop("data", None)
    if not data:
        raise RecipeError("the recipe names no data (data: SPEC or a list of specs)")
    model = values.pop("model", None) or DEFAULT_MODEL
    allow_download = bool(values.pop("allow_download", False))
    if not values.get("output_dir"):
        raise RecipeError("the recipe names no output_dir")
    try:
        config = LensTrainingConfig(**values)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"invalid training configuration: {exc}") from exc
    return config, model, [str(spec) for spec in data], allow_download


# -- entry point ----------------------------------------------------------------------------------
def train_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-train", description="Train LENS (stage 1, GRPO stage 2, LoRA "
                                     "retraining on robot episodes) from a YAML recipe.")
    parser.add_argument("--recipe", required=True, help="YAML recipe (see training/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--resume", metavar="PATH|latest",
                        help="go on from a checkpoint-N of this run (latest: the newest in output_dir); the same as "
                             "--set resume_from_checkpoint=...")
    args = parser.parse_args(argv)
    try:
        return _train(args)
    finally:
        _leave_process_group()


def _train(args: argparse.Namespace) -> int:
    try:
        overrides = args.overrides + ([f"resume_from_checkpoint={args.resume}"] if args.resume else [])
        recipe = apply_overrides(read_recipe(args.recipe), overrides)
        config, model, specs, allow_download = build_config(recipe)
        from lens_ros.training.trainer import resume_checkpoint

        resume = resume_checkpoint(config)  # a checkpoint that is not there: say so before anything loads
        from accelerate import PartialState  # set up by the config (TrainingArguments)

        state = PartialState()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and state.num_processes == 1:  # e.g. a GPU launcher on a machine without GPUs
            raise RecipeError(f"started as {launched} processes, but they are not connected (each would train "
                              "alone and write the same checkpoints); on CPUs add --set use_cpu=true")
        # Several processes: the main one first, as a synthetic data set is written into output_dir
        # (all writing it at once, one read a half-written file).
        with state.main_process_first():
            samples = load_data(specs, training=True, work_dir=config.output_dir, seed=config.seed)
        if len(samples) == 0:
            raise RecipeError(f"the data ({', '.join(specs)}) holds no samples")
    except (RecipeError, DataSpecError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from lens_ros.model.checkpoint import ModelUnavailableError
    from lens_ros.training.trainer import SetupError, train_lens

    print(f"lens-train: stage {config.stage}, model {model}, {len(samples)} samples, output {config.output_dir}"
          + (f", resuming from {resume}" if resume else ""))
    try:
        final = train_lens(config, model, samples, allow_download=allow_download)
    except (ModelUnavailableError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"lens-train: final checkpoint {final}")
    state.wait_for_everyone()  # then every process leaves the process group at the same point
    return 0


def _leave_process_group() -> None:
    """Destroy the process group a launch set up while the interpreter is still whole, as torch asks of
    every process at the end of training. Without it, gloo's worker threads can still hold finished work
    whose tensors are freed during interpreter shutdown, and a process whose training succeeded aborts
    (SIGABRT, "terminate called without an active exception"; seen under FSDP2 on 2 CPU processes)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group to leave
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(train_main())
