"""The pipeline folder: the one module that reads and writes it.

    model_index.json        diffusers' index: the class, its components, and the pipeline's own settings:
                            prediction_type, sampling defaults, and ``stages`` (the base now; the cascade
                            adds its upsamplers)
    unet/                   ComposerUNet: config.json + composer_unet.safetensors
    scheduler/              scheduler_config.json: the sampler, on the model's training noise schedule
    decomposers/            the DecomposerSet: config.yaml, copied weight files, trainable weights
                            (decomposers.folder)
    upsampler_256/          optional upsampling stages (ComposerUNet, an sr preset), each with its own
    upsampler_256_scheduler/  scheduler; their settings (resolution, scale, aug_level, steps) are their
    upsampler_1024/ ...     ``stages`` entries. A stage trained alone is a *stage folder* (unet/,
                            scheduler/, stage.json = its entry); ``attach_stage`` adds one to a pipeline.

Folders are published atomically (written beside the old one, then swapped), so a reader never sees a
half-written folder and a crash leaves the previous one. Folders of wave 1 (index entries
"composer.unet", a "sampler" key) still load, and ``upgrade`` converts one in place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

INDEX_NAME = "model_index.json"
STAGING_MARK = ".tmp-"  # FINAL.tmp-PID-MS: a folder being written
RETIRED_MARK = ".old"  # FINAL.old: the previous folder, between the two renames of a swap
STAGE_NAME = "stage.json"  # a stage folder's settings (its entry of model_index.json's ``stages``)
# Component folders not listed in model_index.json (diffusers ignores them), kept when a pipeline is re-saved:
# ldznet/ (composer.ldznet.segmenter; it checks on load that it still fits the folder's base).
EXTRA_COMPONENTS = ("ldznet",)


def base_stage(resolution: int) -> dict[str, Any]:
    return {"name": "base", "component": "unet", "resolution": int(resolution)}


# --- reading -----------------------------------------------------------------------------------------------

def local_folder(source: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local pipeline folder for a path or a hub id (fetched, or taken from the Hugging Face cache)."""
    path = Path(source)
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"{source} is not a pipeline folder (no model_index.json); give the folder written by "
                                "`composer-diffusion train` (output_dir/pipeline) or a hub id org/name")
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(text, **hub_kwargs))
    except Exception as error:  # hub errors come in many classes; one line naming the id
        raise FileNotFoundError(f"hub id {text!r} is neither cached nor downloadable here "
                                f"({type(error).__name__}); give a local folder") from None


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (no {INDEX_NAME}); give the folder written by "
                                "`composer-diffusion train` (output_dir/pipeline)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON: the folder is damaged; re-save or re-download it") from None
    if not isinstance(index, dict) or index.get("_class_name") != "ComposerPipeline":
        raise ValueError(f"{path} does not describe a ComposerPipeline")
    return index


def is_legacy(index: dict[str, Any]) -> bool:
    """Written by wave 1: component modules named composer.unet, the sampler as a name."""
    return "sampler" in index or (index.get("unet") or [None])[0] == "composer.unet"


def load_legacy(folder: Path, *, load_decomposers: bool = True, trust_pickle: bool = False) -> dict[str, Any]:
    """The constructor arguments of ComposerPipeline from a wave-1 folder."""
    from diffusers import DDPMScheduler

    from composer.diffusion.schedulers import make_scheduler
    from composer.models.unet import ComposerUNet
    from decomposers.folder import load_decomposers

    index = read_index(folder)
    training = DDPMScheduler.from_pretrained(folder / "scheduler")
    sampler = index.get("sampler", "ddpm")
    decomposers = None
    if load_decomposers and (folder / "decomposers" / "config.yaml").is_file():
        decomposers = load_decomposers(folder / "decomposers", trust_pickle=trust_pickle)
    return {"unet": ComposerUNet.from_pretrained(folder / "unet"),
            "scheduler": make_scheduler(sampler, training.config), "decomposers": decomposers,
            "prediction_type": training.config.prediction_type, "sampling": {"scheduler": sampler}}


def unet_folder(source: str | os.PathLike) -> Path:
    """The base UNet's folder of a pipeline folder (PIPELINE/unet), or ``source`` itself for a UNet folder."""
    source = Path(source)
    return source / "unet" if is_pipeline_folder(source) else source


def is_pipeline_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / INDEX_NAME).is_file()


def weights(folder: str | os.PathLike) -> dict[str, Any]:
    """Every trained tensor of a pipeline folder, named as in the training module: ``unet.*`` and
    ``decomposers.<name>.*`` (trainable decomposers); for warm starts."""
    from safetensors.torch import load_file

    from composer.models.unet import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
    from decomposers.folder import WEIGHTS_NAME as DECOMPOSER_WEIGHTS

    folder = Path(folder)
    read_index(folder)
    unet = folder / "unet" / WEIGHTS_NAME
    if not unet.is_file():
        unet = folder / "unet" / LEGACY_WEIGHTS_NAME
    if not unet.is_file():
        raise FileNotFoundError(f"{folder} has no UNet weights (unet/{WEIGHTS_NAME})")
    state = {f"unet.{k}": v.float() if v.is_floating_point() else v for k, v in load_file(unet).items()}
    for path in sorted((folder / "decomposers").glob(f"*/{DECOMPOSER_WEIGHTS}")):
        state.update({f"decomposers.{path.parent.name}.{k}": v for k, v in load_file(path).items()})
    return state


def slot_encoder_folder(source: str | os.PathLike) -> Path:
    """The slot encoder's folder for a pipeline folder (PIPELINE/decomposers/slots), or ``source`` itself
    when it is a slots folder already (written by SlotsDecomposer.save_pretrained)."""
    from decomposers.folder import read_config

    source = Path(source)
    if not is_pipeline_folder(source):
        return source
    if "slots" not in (read_config(source / "decomposers").get("enabled") or []):
        raise ValueError(f"the pipeline {source} was trained without slots (decomposers.enabled lacks 'slots'); "
                         "train with slots enabled")
    return source / "decomposers" / "slots"


def has_decomposers(folder: Path) -> bool:
    return (folder / "decomposers" / "config.yaml").is_file()


# --- writing -----------------------------------------------------------------------------------------------

def publish(pipe: Any, final: str | os.PathLike, **save_kwargs: Any) -> Path:
    """Write ``pipe`` to ``final`` atomically: into a staging folder beside it, then swapped in. Folders of
    EXTRA_COMPONENTS that the old ``final`` had and ``pipe`` does not write are carried over."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f"{final.name}{STAGING_MARK}{os.getpid()}-{int(time.time() * 1000)}")
    try:
        pipe.save_pretrained(staging, **save_kwargs)
        for name in EXTRA_COMPONENTS:
            if (final / name).is_dir() and not (staging / name).exists():
                shutil.copytree(final / name, staging / name)
        swap_in(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def swap_in(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace folder ``final`` by the fully written folder ``staging`` (fsynced first). Folders cannot be
    swapped in one rename, so the old one is renamed to FINAL.old first; ``recover`` puts it back if the
    process dies between the two renames."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    old = final.with_name(final.name + RETIRED_MARK)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, final)
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover(final: str | os.PathLike) -> None:
    """After a crash: put FINAL.old back if the new folder never arrived; drop staging leftovers."""
    final = Path(final)
    old = final.with_name(final.name + RETIRED_MARK)
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)
    if final.parent.is_dir():
        for leftover in final.parent.glob(f"{final.name}{STAGING_MARK}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename is durable once its folder is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder below a folder, to disk."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


# --- stage folders: an upsampling stage trained alone, before it joins a pipeline -----------------------------

def is_stage_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / STAGE_NAME).is_file()


def read_stage(folder: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """(ComposerUNet, scheduler, stage entry) of a stage folder (unet/, scheduler/, stage.json)."""
    import diffusers

    from composer.models.unet import ComposerUNet

    folder = Path(folder)
    if not is_stage_folder(folder):
        raise FileNotFoundError(f"{folder} is not a stage folder (no {STAGE_NAME}); give the folder a run with "
                                "train.stage=upsampler writes (output_dir/stage)")
    try:
        entry = json.loads((folder / STAGE_NAME).read_text())
        scheduler_class = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    except (OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{folder}: {STAGE_NAME} or scheduler/scheduler_config.json is missing or damaged; "
                         "publish the stage again") from None
    if not hasattr(diffusers, scheduler_class):
        raise ValueError(f"{folder}/scheduler names {scheduler_class!r}, which is not a diffusers scheduler")
    scheduler = getattr(diffusers, scheduler_class).from_pretrained(folder / "scheduler")
    return ComposerUNet.from_pretrained(folder / "unet"), scheduler, entry


def write_stage(final: str | os.PathLike, unet: Any, scheduler: Any, entry: dict[str, Any], *,
                weights_dtype: Any = None) -> Path:
    """Write a stage folder atomically: unet/ (ComposerUNet), scheduler/ and stage.json (its stages entry)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f"{final.name}{STAGING_MARK}{os.getpid()}-{int(time.time() * 1000)}")
    try:
        unet.save_pretrained(staging / "unet", dtype=weights_dtype)
        scheduler.save_pretrained(staging / "scheduler")
        (staging / STAGE_NAME).write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
        swap_in(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def stored_dtype(unet_folder: str | os.PathLike) -> Any:
    """torch.float16 / bfloat16 when a UNet folder stores its weights so, else None (float32)."""
    import torch
    from safetensors import safe_open

    from composer.models.unet import WEIGHTS_NAME

    path = Path(unet_folder) / WEIGHTS_NAME
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(next(iter(dtypes - {"I64", "BOOL"}), ""), None)


def attach_stage(pipeline: str | os.PathLike, stage: str | os.PathLike, *, name: str | None = None,
                 trust_pickle: bool = False) -> Path:
    """Add (or replace) the upsampling stage of folder ``stage`` in pipeline folder ``pipeline``, atomically;
    the weights keep the pipeline's stored dtype. ``name``: the component it becomes (default: its own)."""
    from composer.pipelines.composer_pipeline import ComposerPipeline

    pipeline = Path(pipeline)
    unet, scheduler, entry = read_stage(stage)
    pipe = ComposerPipeline.from_pretrained(pipeline, trust_pickle=trust_pickle)
    pipe.add_stage(unet, scheduler, {**entry, **({"name": name} if name else {})})
    return publish(pipe, pipeline, weights_dtype=stored_dtype(pipeline / "unet"))


def _snapshot_unet(source: Path, like: Any) -> Any:
    """The base UNet held by a checkpoint or EMA snapshot folder (ema.safetensors, else model.safetensors, keys
    ``unet.*``), built with the architecture of ``like`` (the pipeline's UNet), or None for other folders."""
    from safetensors.torch import load_file

    from composer.models.unet import ComposerUNet, check_state_dict

    path = next((source / n for n in ("ema.safetensors", "model.safetensors") if (source / n).is_file()), None)
    if path is None:
        return None
    state = {k[len("unet."):]: v.float() for k, v in load_file(path).items() if k.startswith("unet.")}
    unet = ComposerUNet.from_config(like.config)
    try:
        check_state_dict(unet, state, path)
    except ValueError as error:
        raise ValueError(f"{path}'s base UNet weights do not fit the pipeline's UNet, not the same model preset: "
                         f"{error}") from None
    unet.load_state_dict(state)
    return unet


def replace_base(pipeline: str | os.PathLike, source: str | os.PathLike, *, trust_pickle: bool = False) -> Path:
    """Put the base UNet of ``source`` (a pipeline or UNet folder, e.g. a run's EMA pipeline/, or a checkpoint
    or EMA snapshot folder, whose weights fill the pipeline's own UNet architecture) into pipeline folder
    ``pipeline``, atomically, in the folder's stored dtype; its stages and decomposers stay. Components
    trained on the old base's features (EXTRA_COMPONENTS: the LD-ZNet segmenter) are removed, since they
    would no longer load against it: retrain and attach them again."""
    from composer.models.unet import ComposerUNet
    from composer.pipelines.composer_pipeline import ComposerPipeline

    pipeline = Path(pipeline)
    pipe = ComposerPipeline.from_pretrained(pipeline, trust_pickle=trust_pickle)
    unet = _snapshot_unet(Path(source), pipe.unet) or ComposerUNet.from_pretrained(unet_folder(source))
    if sorted(unet.accepted_conditions) != sorted(pipe.unet.accepted_conditions):
        raise ValueError(f"{source}'s UNet takes {', '.join(unet.accepted_conditions)}, the pipeline's "
                         f"{', '.join(pipe.unet.accepted_conditions)}: they are not the same model family")
    pipe.register_modules(unet=unet)
    dtype = stored_dtype(pipeline / "unet")
    staging = pipeline.with_name(f"{pipeline.name}{STAGING_MARK}{os.getpid()}-{int(time.time() * 1000)}")
    try:
        pipe.save_pretrained(staging, weights_dtype=dtype)  # no EXTRA_COMPONENTS carried over
        swap_in(staging, pipeline)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return pipeline


def upgrade(folder: str | os.PathLike, *, weights_dtype: Any = None) -> Path:
    """Convert a wave-1 pipeline folder in place (atomically) to today's layout."""
    from composer.pipelines.composer_pipeline import ComposerPipeline

    folder = Path(folder)
    pipe = ComposerPipeline(**load_legacy(folder))
    return publish(pipe, folder, weights_dtype=weights_dtype)


USAGE = ("usage: python -m composer.pipelines.layout upgrade FOLDER [--fp16]\n"
         "       python -m composer.pipelines.layout attach PIPELINE STAGE_FOLDER [--name upsampler_256|upsampler_1024]\n"
         "       python -m composer.pipelines.layout replace-base PIPELINE NEW_BASE  (a run's pipeline/, a unet/ or a checkpoint)")

if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if len(args) >= 2 and args[0] == "upgrade":
        import torch

        print(upgrade(args[1], weights_dtype=torch.float16 if "--fp16" in args else None))
    elif len(args) == 3 and args[0] == "replace-base":
        print(replace_base(args[1], args[2]))
    elif len(args) in (3, 5) and args[0] == "attach" and (len(args) == 3 or args[3] == "--name"):
        print(attach_stage(args[1], args[2], name=args[4] if len(args) == 5 else None))
    else:
        sys.exit(USAGE)
