"""The training loop of the 64 px base model, on one CPU or many GPUs through accelerate.

    python -m composer train --config configs/train/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 -m composer train --config ...   (CPU: ACCELERATE_USE_CPU=true)

One step: a batch streamed from shards (split by node and worker) -> frozen decomposers batched on the
training device under no_grad (precomputed members used when the shard has them) -> dropout keep masks ->
DDPM epsilon loss; trainable decomposers (slots) run inside the model's forward so DDP synchronises them.
All step randomness comes from a generator seeded by (seed, rank, images seen), so a resumed run repeats
the uninterrupted one. Checkpoints (accelerate state + EMA + data position) are written atomically every
``train.checkpoint_every_images``, with the EMA pipeline folder ``output_dir/pipeline`` beside them.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from omegaconf import DictConfig, OmegaConf

from composer.config import save_config
from composer.data.loader import make_loader
from composer.diffusion.denoiser import PREDICTION_TYPES, Denoiser, NoiseSchedule
from composer.diffusion.dropout import DropoutPolicy
from composer.pipelines import layout
from composer.pipelines.composer_pipeline import ComposerPipeline
from composer.train.accelerator import make_accelerator
from composer.train.ema import EMA
from composer.train.module import TrainingModule
from composer.train.monitor import Monitor
from composer.train.samples import centre_mask, compose_grid, condition_subsets, save_grid
from composer.train.schedule import make_lr_scheduler
from composer.train.seeding import step_generator
from composer.train.rundir import Run, open_run, recorded_config
from composer.train.state import (TrainingState, load_checkpoint, save_checkpoint, stop_on_failed_write,
                                  write_json_atomic)
from composer.models.config import build_model
from decomposers.set import DecomposerSet

RAW_EXTRAS = ("instances", "classes", "depth")


def _extras(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "image"}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary (images seen, last loss, paths).
    Raises RunError (one line) when output_dir is in use by another trainer, holds a run while neither
    --resume nor --overwrite was given, or has no checkpoint fit to resume; nothing in it is changed then."""
    tcfg = cfg.train
    accelerator = make_accelerator(device=tcfg.device, mixed_precision=tcfg.mixed_precision,
                                   grad_accumulation=tcfg.grad_accumulation, project_dir=str(cfg.output_dir))
    expected = TrainingState(world_size=accelerator.num_processes, batch_size=int(cfg.data.batch_size),
                             grad_accumulation=tcfg.grad_accumulation, seed=cfg.seed)
    run = open_run(accelerator, cfg.output_dir, resume=tcfg.resume, overwrite=bool(tcfg.get("overwrite", False)),
                   keep=tcfg.keep_checkpoints, expected=expected, init_from=tcfg.init_from,
                   say=lambda line: print(line, flush=True))
    try:
        return _train(cfg, accelerator, run)
    finally:
        run.close()


def _train(cfg: DictConfig, accelerator, run: Run) -> dict[str, Any]:
    tcfg = cfg.train
    out = Path(cfg.output_dir)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # 1. Decomposers, model, optimiser, schedules
    decomposers = DecomposerSet.from_config(cfg.decomposers).to(device)
    trainable_names = [n for n, d in decomposers.decomposers.items() if getattr(d, "trainable", False)]
    frozen_names = [n for n in decomposers.names if n not in trainable_names]
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    unet = build_model(cfg.model, decomposers.specs())
    module = TrainingModule(unet, {n: decomposers.decomposers[n] for n in trainable_names})
    module.train()
    init_report = None
    if tcfg.init_from and not tcfg.resume:
        init_report = load_initial_weights(module, tcfg.init_from)
    optimizer = torch.optim.AdamW(module.parameters(), lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                                  weight_decay=tcfg.weight_decay)
    batch_size = int(cfg.data.batch_size)
    state = TrainingState(world_size=world, batch_size=batch_size, grad_accumulation=tcfg.grad_accumulation,
                          seed=cfg.seed)
    lr_scheduler = make_lr_scheduler(optimizer, images_per_step=state.images_per_step,
                                     warmup_images=tcfg.warmup_images, total_images=tcfg.total_images,
                                     schedule=tcfg.lr_schedule, min_factor=tcfg.min_lr_ratio)
    module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    ema = EMA(accelerator.unwrap_model(module), decay=tcfg.ema_decay, warmup=tcfg.ema_warmup)
    noise_scheduler = make_noise_scheduler(tcfg)
    denoiser = make_denoiser(tcfg, noise_scheduler)  # the loss; the network is called through the module
    dropout = DropoutPolicy(cfg.dropout)

    # 2. Resume
    store = run.store  # output_dir is locked and checked (rundir.open_run)
    if accelerator.is_main_process:
        store.remove_leftovers()
        layout.recover(out / "pipeline")
    accelerator.wait_for_everyone()
    resume, loaded, data_state = run.load(  # falls back to the next verified checkpoint when loading fails
        lambda path: load_checkpoint(accelerator, path, ema, state),
        lambda: {**accelerator.unwrap_model(module).state_dict(), **{f"EMA {k}": v for k, v in ema.shadow.items()}})
    state = loaded or state
    if accelerator.is_main_process:
        save_config(recorded_config(cfg), out)
    loader = make_loader(cfg.data, seed=cfg.seed, rank=rank, world_size=world, state=data_state)
    monitor = Monitor(out / "tensorboard" if tcfg.tensorboard else None, enabled=accelerator.is_main_process,
                      progress=tcfg.progress, total_images=tcfg.total_images, initial_images=state.images_seen,
                      accelerator=accelerator)
    if resume is not None:
        monitor.write(f"resumed from {resume} at {state.images_seen} images (step {state.step})")
    elif init_report is not None:
        monitor.write(init_report)
    held_out = _held_out_batch(cfg, device) if accelerator.is_main_process else None
    loss_log = out / "losses.csv"
    if accelerator.is_main_process:
        trim_loss_log(loss_log, state.images_seen)

    # 3. Train
    t_low, t_high = timestep_bounds(tcfg.timestep_range, tcfg.num_train_timesteps)
    session_start, session_images = time.perf_counter(), state.images_seen
    batches = iter(loader)
    last_loss = float("nan")
    losses: list[tuple[int, float]] = []
    next_checkpoint = _next_multiple(state.images_seen, tcfg.checkpoint_every_images)
    next_sample = _next_multiple(state.images_seen, tcfg.sample_every_images)
    while state.images_seen < tcfg.total_images:
        step_ok = True
        for _ in range(tcfg.grad_accumulation):
            times: dict[str, float] = {}
            start = time.perf_counter()
            batch = next(batches)
            times["data"] = time.perf_counter() - start
            start = time.perf_counter()
            images = batch["image"].to(device)
            generator = step_generator(cfg.seed, rank, state.images_seen)
            extras = _extras(batch, device)
            with torch.no_grad():
                conditions = decomposers.decompose(images, captions=batch["caption"], extras=extras, training=True,
                                                   generator=generator, names=frozen_names)
            keep = dropout.sample(decomposers.names, images.shape[0], generator)
            noise = torch.randn(images.shape, generator=generator).to(device)
            timesteps = torch.randint(t_low, t_high, (images.shape[0],), generator=generator).to(device)
            noisy = denoiser.add_noise(images * 2 - 1, noise, timesteps)
            times["decompose"] = time.perf_counter() - start
            start = time.perf_counter()

            def trainable(images=images, extras=extras, generator=generator):
                return decomposers.decompose(images, extras=extras, training=True, generator=generator,
                                             names=trainable_names)

            with accelerator.accumulate(module):
                with accelerator.autocast():
                    prediction = module(noisy, timesteps, conditions, {k: v.to(device) for k, v in keep.items()},
                                        trainable if trainable_names else None)
                loss = denoiser.loss(prediction, images * 2 - 1, noise, timesteps)
                finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1).float()).min().item() == 1.0
                if finite:
                    accelerator.backward(loss)
                else:
                    step_ok = False
                    monitor.write(f"non-finite loss at step {state.step} ({state.images_seen} images): step skipped")
                if accelerator.sync_gradients:
                    grad_norm = None
                    if step_ok and tcfg.grad_clip > 0:
                        grad_norm = float(accelerator.clip_grad_norm_(module.parameters(), tcfg.grad_clip))
                        if not math.isfinite(grad_norm):
                            step_ok = False
                            monitor.write(f"non-finite gradients at step {state.step}: step skipped")
                    if step_ok:
                        optimizer.step()
                    else:
                        state.skipped_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    lr_scheduler.step()
            times["model"] = time.perf_counter() - start
            last_loss = float(loss.detach())
            state.images_seen += images.shape[0] * world
            monitor.record_micro_batch(loss=last_loss, times=times, keep=keep)
        state.step += 1
        if step_ok:
            ema.update(accelerator.unwrap_model(module))
            state.ema_updates = ema.updates
        monitor.record_step(grad_norm=None, images_seen=state.images_seen, images_delta=state.images_per_step)
        done = state.images_seen >= tcfg.total_images
        if state.step % tcfg.log_every_steps == 0 or done:  # the last, partial window is logged too
            scalars = monitor.flush(step=state.step, images_seen=state.images_seen, lr=lr_scheduler.get_last_lr()[0],
                                    skipped_steps=state.skipped_steps, loader_skipped=loader.skipped())
            if "train/loss" in scalars:
                losses.append((state.images_seen, scalars["train/loss"]))
                if accelerator.is_main_process:  # appended as it goes, so a killed run keeps its curve
                    with open(loss_log, "a") as handle:
                        handle.write(f"{state.images_seen},{scalars['train/loss']:.6f}\n")
        if done or (next_checkpoint and state.images_seen >= next_checkpoint):
            save_checkpoint(accelerator, store, state, ema, loader.state_dict(), model=accelerator.unwrap_model(module))
            if accelerator.is_main_process:
                with stop_on_failed_write("the EMA pipeline folder", out / "pipeline", store):
                    _publish_pipeline(accelerator.unwrap_model(module), ema, decomposers, cfg, noise_scheduler,
                                      out / "pipeline")
            next_checkpoint = _next_multiple(state.images_seen, tcfg.checkpoint_every_images)
        if accelerator.is_main_process and (done or (next_sample and state.images_seen >= next_sample)):
            _sample_grid(out / "pipeline", held_out, cfg, state.images_seen, monitor, device)
            next_sample = _next_multiple(state.images_seen, tcfg.sample_every_images)
    monitor.close()
    accelerator.wait_for_everyone()
    digest = parameter_digest(accelerator.unwrap_model(module))
    digests = [digest]
    if world > 1:  # every replica must end with the same weights; say so if they do not
        from accelerate.utils import gather_object

        digests = gather_object([digest])
        if len(set(digests)) > 1:
            monitor.write(f"WARNING: the {world} replicas ended with different weights (digests {digests})")
    loader_skipped = monitor.sum_over_processes(loader.skipped())
    if accelerator.is_main_process:
        write_json_atomic(out / "run_summary.json", {
            "images_seen": state.images_seen, "step": state.step, "skipped_steps": state.skipped_steps,
            "last_loss": last_loss, "world_size": world, "replica_digests": digests,
            "loader_skipped": loader_skipped, "resumed_from": str(resume) if resume is not None else None,
            "session_images": state.images_seen - session_images,
            "session_seconds": round(time.perf_counter() - session_start, 1)})
    accelerator.end_training()
    return {"images_seen": state.images_seen, "parameter_digest": digest, "replica_digests": digests, "step": state.step, "last_loss": last_loss,
            "skipped_steps": state.skipped_steps, "pipeline": str(out / "pipeline"), "losses": losses,
            "loader_skipped": loader_skipped}


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on every rank when the replicas are identical."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def trim_loss_log(path: Path, images_seen: int) -> None:
    """Start ``losses.csv`` (images_seen,loss) for a run at ``images_seen``: rows logged after that point by
    an interrupted run are dropped (the resumed run logs them again); a fresh run starts an empty log."""
    rows = []
    if images_seen > 0 and path.is_file():
        for line in path.read_text().splitlines()[1:]:
            try:
                if int(line.split(",", 1)[0]) <= images_seen:
                    rows.append(line + "\n")
            except ValueError:  # a line cut by a crash
                continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("images_seen,loss\n" + "".join(rows))
    tmp.replace(path)


def load_initial_weights(module: TrainingModule, source: str | Path) -> str:
    """Warm start (train.init_from): copy matching tensors from a checkpoint folder (its EMA weights when
    present) or a pipeline folder into ``module``; tensors the source lacks keep their fresh initialisation.
    Returns a one-line report. Raises ValueError for a missing source or a tensor whose shape differs."""
    from safetensors.torch import load_file

    source = Path(source)
    state: dict[str, torch.Tensor] = {}
    if (source / "ema.safetensors").is_file() or (source / "model.safetensors").is_file():
        state = load_file(source / ("ema.safetensors" if (source / "ema.safetensors").is_file() else "model.safetensors"))
    elif layout.is_pipeline_folder(source):
        state = layout.weights(source)
    else:
        raise ValueError(f"train.init_from={source}: not a checkpoint folder (model.safetensors) or a pipeline "
                         "folder (model_index.json); pass e.g. runs/tiny/checkpoints/<name> or runs/tiny/pipeline")
    own = module.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"train.init_from={source}: {k} has shape {tuple(state[k].shape)} there but "
                         f"{tuple(own[k].shape)} in this model; use a source built with the same model preset")
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ValueError(f"train.init_from={source}: no tensor matches this model (different conditions or preset?)")
    module.load_state_dict(matched, strict=False)
    fresh = len([k for k in own if k not in matched])
    ignored = len([k for k in state if k not in own])
    return f"initialised from {source}: {len(matched)} tensors loaded, {fresh} new (fresh), {ignored} ignored"


def make_denoiser(tcfg: DictConfig, noise_scheduler: DDPMScheduler) -> Denoiser:
    """The parameterisation and loss of a run (train.prediction_type, train.loss_weighting, train.snr_gamma)."""
    return Denoiser(None, NoiseSchedule.from_config(noise_scheduler.config), prediction_type=tcfg.prediction_type,
                    loss_weighting=tcfg.loss_weighting, snr_gamma=tcfg.snr_gamma)


def make_noise_scheduler(tcfg: DictConfig) -> DDPMScheduler:
    """The training noise schedule; saved with the pipeline, so samplers inherit its prediction type."""
    if tcfg.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"train.prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                         f"got {tcfg.prediction_type!r}")
    return DDPMScheduler(num_train_timesteps=tcfg.num_train_timesteps, beta_schedule=tcfg.beta_schedule,
                         prediction_type=tcfg.prediction_type)


def timestep_bounds(fractions, num_train_timesteps: int) -> tuple[int, int]:
    """[low, high) integer noise levels from train.timestep_range fractions, checked."""
    if len(fractions) != 2 or not 0.0 <= float(fractions[0]) < float(fractions[1]) <= 1.0:
        raise ValueError(f"train.timestep_range must be two fractions 0 <= lo < hi <= 1, got {list(fractions)}")
    low = int(round(float(fractions[0]) * num_train_timesteps))
    high = max(low + 1, int(round(float(fractions[1]) * num_train_timesteps)))
    return low, high


def _next_multiple(images_seen: int, every: int) -> int:
    return (images_seen // every + 1) * every if every > 0 else 0


def _publish_pipeline(module: TrainingModule, ema: EMA, decomposers: DecomposerSet, cfg: DictConfig,
                      noise_scheduler: DDPMScheduler, final: Path) -> None:
    """Write the EMA weights (UNet and trainable decomposers) as a pipeline folder, atomically replacing the
    previous one (composer.pipelines.layout.publish)."""
    from composer.diffusion.schedulers import make_scheduler

    averaged = copy.deepcopy(module).cpu()
    ema.copy_to(averaged)
    averaged.eval()
    live = {name: decomposers.decomposers[name] for name in averaged.decomposers}
    try:  # the published set carries the EMA copies of the trainable decomposers
        for name, decomposer in averaged.decomposers.items():
            decomposers.decomposers[name] = decomposer
        pipeline = ComposerPipeline(averaged.unet, make_scheduler(cfg.sample.scheduler, noise_scheduler.config),
                                    decomposers, prediction_type=cfg.train.prediction_type,
                                    sampling=OmegaConf.to_container(cfg.sample, resolve=True))
        layout.publish(pipeline, final)
    finally:
        for name, decomposer in live.items():
            decomposers.decomposers[name] = decomposer


def _held_out_batch(cfg: DictConfig, device: torch.device) -> dict[str, Any] | None:
    """A fixed batch for sample grids: from train.sample_shards, or the training shards with another seed."""
    data = copy.deepcopy(cfg.data)
    if cfg.train.sample_shards:
        data.shards = list(cfg.train.sample_shards)
    data.batch_size = cfg.train.sample_images
    data.num_workers = 0
    data.crop = "center"
    try:
        batch = next(iter(make_loader(data, seed=cfg.seed + 1_000_003, epochs=1)))
    except StopIteration:
        return None
    return batch


@torch.no_grad()
def _sample_grid(pipeline_dir: Path, batch: dict[str, Any] | None, cfg: DictConfig, images_seen: int,
                 monitor: Monitor, device: torch.device) -> Path | None:
    """EMA samples for the held-out batch under: all conditions, none, and each single condition."""
    if batch is None or not (pipeline_dir / "model_index.json").is_file():
        return None
    pipe = ComposerPipeline.from_pretrained(pipeline_dir, device=device)
    images = batch["image"].to(device)
    count = images.shape[0]
    conditions = pipe.decomposers.decompose(images, captions=batch["caption"], extras=_extras(batch, device),
                                            training=False, mask=centre_mask(images))
    rows = []
    for label, names in condition_subsets(pipe.decomposers.names):
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(count)]
        out = pipe(conditions.subset(names), generator=generators, output_type="pt", progress=False)
        rows.append((label, out.images))
    grid = compose_grid(images.cpu(), rows)
    path = save_grid(grid, pipeline_dir.parent / "samples" / f"grid-{images_seen:012d}.png")
    monitor.add_image("samples/ema", grid, images_seen)
    monitor.write(f"sample grid -> {path}")
    return path
