"""The training loop of any stage, on one CPU or many GPUs through accelerate.

    python -m composer train --config configs/train/tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 -m composer train --config ...   (CPU: ACCELERATE_USE_CPU=true)

One step (composer.train.step): a batch streamed from shards (split by node and worker) -> frozen decomposers
batched on the training device under no_grad (precomputed members used when the shard has them) -> dropout
keep masks -> the denoiser's weighted loss; trainable decomposers (slots) run inside the model's forward so
DDP synchronises them. Checkpoints (accelerate state + EMA + data position, with a manifest of checksums)
are written atomically every ``train.checkpoint_every_images``, with the EMA pipeline folder
``output_dir/pipeline`` beside them.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from omegaconf import DictConfig

from composer.config import save_config
from composer.data.loader import make_loader
from composer.diffusion.denoiser import PREDICTION_TYPES, Denoiser, NoiseSchedule
from composer.diffusion.dropout import DropoutPolicy
from composer.diffusion.schedulers import make_scheduler
from composer.models.config import build_model
from composer.models.groupnorm import use_nhwc_group_norm
from composer.models.unet import ComposerUNet
from composer.pipelines import layout
from composer.runtime import describe_precision
from composer.train.accelerator import make_accelerator
from composer.train.config import STAGES
from composer.train.ema import EMA
from composer.train.module import TrainingModule
from composer.train.monitor import Monitor
from composer.train.publish import publish_ema_pipeline
from composer.train.rundir import Run, open_run, recorded_config
from composer.train.samples import held_out_batch, sample_grid
from composer.train.schedule import make_lr_scheduler
from composer.train.state import (
    TrainingState,
    load_checkpoint,
    save_checkpoint,
    stop_on_failed_write,
    write_json_atomic,
)
from composer.train.step import TrainingStep
from composer.train.threads import ThreadGovernor
from composer.train.warmstart import load_initial_weights
from decomposers.set import DecomposerSet
from upsamplers.presets import build_upsampler
from upsamplers.stage import StageSettings
from upsamplers.training import UpsamplerConditioner


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary (images seen, last loss, paths).
    Raises RunError (one line) when output_dir is in use by another trainer, holds a run while neither
    --resume nor --overwrite was given, or has no checkpoint fit to resume; nothing in it is changed then."""
    if str(cfg.train.stage) == "ldznet":  # a segmentation network on a frozen base: a loop of its own
        from composer.ldznet.train import train_ldznet

        return train_ldznet(cfg)
    tcfg = cfg.train
    check_before_training(cfg)
    accelerator = make_accelerator(device=tcfg.device, mixed_precision=tcfg.mixed_precision,
                                   grad_accumulation=tcfg.grad_accumulation, project_dir=str(cfg.output_dir))
    if accelerator.is_main_process:
        print(describe_precision(str(accelerator.mixed_precision), accelerator.device), flush=True)
    expected = TrainingState(world_size=accelerator.num_processes, batch_size=int(cfg.data.batch_size),
                             grad_accumulation=tcfg.grad_accumulation, seed=cfg.seed)
    run = open_run(accelerator, cfg.output_dir, resume=tcfg.resume, overwrite=bool(tcfg.get("overwrite", False)),
                   keep=tcfg.keep_checkpoints, expected=expected, init_from=tcfg.init_from,
                   say=lambda line: print(line, flush=True))
    try:
        return Trainer(cfg, accelerator, run).run()
    finally:
        run.close()


def check_before_training(cfg: DictConfig) -> None:
    """Settings that would only fail at the end of a run (or make it report a pipeline it never wrote)."""
    from omegaconf import OmegaConf

    from composer.diffusion.schedulers import SampleConfig

    if int(cfg.train.total_images) < 1:
        raise ValueError(f"train.total_images must be at least 1 (the images the run trains to), got {cfg.train.total_images}")
    SampleConfig.from_dict(OmegaConf.to_container(cfg.sample, resolve=True))  # the sampler it will publish with


class Trainer:
    """One session of a run: built, resumed, trained to train.total_images, summarised."""

    def __init__(self, cfg: DictConfig, accelerator, run: Run):
        self.cfg, self.tcfg, self.accelerator, self.run_dir = cfg, cfg.train, accelerator, run
        self.out = Path(cfg.output_dir)
        self.main = accelerator.is_main_process
        self.losses: list[tuple[int, float]] = []
        self.last_loss = float("nan")
        self.checkpointed_at = -1

    def run(self) -> dict[str, Any]:
        # 1. Decomposers, model, optimiser, schedules, the step
        init_report = self.build()
        # 2. Resume from the newest checkpoint that verifies (or start fresh)
        resume = self.resume()
        # 3. Data, logs and the held-out batch for sample grids
        self.prepare_session(resume, init_report)
        # 4. Train: optimizer steps until train.total_images, logging, checkpoints and grids as configured;
        #    SIGTERM or Ctrl-C ends the step under way, writes a checkpoint and stops (a second one kills)
        with GracefulStop() as stop:
            while self.state.images_seen < self.tcfg.total_images and not self.stop_agreed(stop):
                self.optimizer_step()
                self.after_step()
            if stop.signal_name is not None:
                self.stopped_by(stop.signal_name)
        # 5. Summarise the session
        return {**self.finish(resume), "stopped_by": stop.signal_name, "exit_code": stop.exit_code}

    def stop_agreed(self, stop: GracefulStop) -> bool:
        """True once any process received a stop signal; every process stops after the same step."""
        flag = stop.signal_name is not None
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), "sum")
            if float(total.item()) > 0 and not flag:
                stop.signal_name, stop.exit_code = "a stop signal on another process", 143
            flag = float(total.item()) > 0
        return flag

    def stopped_by(self, name: str) -> None:
        state = self.state
        if state.images_seen != self.checkpointed_at:  # after_step may just have written this one
            self.checkpoint()
        self.monitor.write(f"stopped by {name} at {state.images_seen} images (step {state.step}); checkpoint written: "
                           "continue with the same command and --resume auto")

    def build(self) -> str | None:
        cfg, tcfg, accelerator = self.cfg, self.tcfg, self.accelerator
        self.upsampler = stage_kind(cfg) == "upsampler"
        self.decomposers = DecomposerSet.from_config(cfg.decomposers).to(accelerator.device)
        trainable = {n: d for n, d in self.decomposers.decomposers.items() if getattr(d, "trainable", False)}
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        module = TrainingModule(build_stage_model(cfg, self.decomposers.specs()), trainable)
        module.train()
        init_report = load_initial_weights(module, tcfg.init_from) if tcfg.init_from and not tcfg.resume else None
        layout_name = apply_memory_format(module, tcfg.memory_format, accelerator.device, accelerator.mixed_precision)
        if accelerator.is_main_process:
            print(f"memory format: {layout_name}{' (auto)' if tcfg.memory_format == 'auto' else ''}", flush=True)
        optimizer = make_optimizer(module, tcfg, accelerator.device)
        self.state = TrainingState(world_size=accelerator.num_processes, batch_size=int(cfg.data.batch_size),
                                   grad_accumulation=tcfg.grad_accumulation, seed=cfg.seed)
        lr_scheduler = make_lr_scheduler(optimizer, images_per_step=self.state.images_per_step,
                                         warmup_images=tcfg.warmup_images, total_images=tcfg.total_images,
                                         schedule=tcfg.lr_schedule, min_factor=tcfg.min_lr_ratio)
        self.module, optimizer, self.lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
        self.ema = EMA(accelerator.unwrap_model(self.module), decay=tcfg.ema_decay, warmup=tcfg.ema_warmup)
        if tcfg.compile:  # in place (nn.Module.compile): parameter names, checkpoints and EMA are unchanged
            accelerator.unwrap_model(self.module).unet.unet.compile()
        self.noise_scheduler = make_noise_scheduler(tcfg)
        self.training_step = TrainingStep(accelerator=accelerator, module=self.module, optimizer=optimizer,
                                 lr_scheduler=self.lr_scheduler, decomposers=self.decomposers,
                                 denoiser=make_denoiser(tcfg, self.noise_scheduler), dropout=DropoutPolicy(cfg.dropout),
                                 timestep_bounds=timestep_bounds(tcfg.timestep_range, tcfg.num_train_timesteps),
                                 seed=cfg.seed, grad_clip=tcfg.grad_clip,
                                 conditioner=UpsamplerConditioner(tcfg.upsampler) if self.upsampler else None)
        return init_report

    def resume(self) -> Path | None:
        accelerator, store = self.accelerator, self.run_dir.store  # output_dir is locked and checked (open_run)
        if self.main:
            store.remove_leftovers()
            layout.recover(self.out / self.published_name)
        accelerator.wait_for_everyone()
        resume, loaded, self.data_state = self.run_dir.load(  # falls back to the next verified checkpoint
            lambda path: load_checkpoint(accelerator, path, self.ema, self.state),
            lambda: {**accelerator.unwrap_model(self.module).state_dict(),
                     **{f"EMA {k}": v for k, v in self.ema.shadow.items()}})
        self.state = loaded or self.state
        if self.main:
            save_config(recorded_config(self.cfg), self.out)
        return resume

    def prepare_session(self, resume: Path | None, init_report: str | None) -> None:
        cfg, tcfg, accelerator = self.cfg, self.tcfg, self.accelerator
        self.loader = make_loader(cfg.data, seed=cfg.seed, rank=accelerator.process_index,
                                  world_size=accelerator.num_processes, state=self.data_state)
        self.batches = iter(self.loader)
        self.threads = ThreadGovernor(tcfg.threads)
        self.monitor = Monitor(self.out / "tensorboard" if tcfg.tensorboard else None, enabled=self.main,
                               progress=tcfg.progress, total_images=tcfg.total_images,
                               initial_images=self.state.images_seen, accelerator=accelerator)
        if resume is not None:
            self.monitor.write(f"resumed from {resume} at {self.state.images_seen} images (step {self.state.step})")
        elif init_report is not None:
            self.monitor.write(init_report)
        self.monitor.write(self.threads.start())
        self.held_out = held_out_batch(cfg, accelerator.device) if self.main and not self.upsampler else None
        self.loss_log = self.out / "losses.csv"
        if self.main:
            trim_loss_log(self.loss_log, self.state.images_seen)
        self.session_start, self.session_images = time.perf_counter(), self.state.images_seen
        self.next_checkpoint = next_multiple(self.state.images_seen, tcfg.checkpoint_every_images)
        self.next_sample = next_multiple(self.state.images_seen, tcfg.sample_every_images)

    def optimizer_step(self) -> None:
        """train.grad_accumulation micro-batches, then one optimizer update (skipped if anything is non-finite)."""
        state, world, ok = self.state, self.accelerator.num_processes, True
        for _ in range(self.tcfg.grad_accumulation):
            start = time.perf_counter()
            batch = next(self.batches)
            data_seconds = time.perf_counter() - start
            micro = self.training_step.micro_batch(batch, state.images_seen)
            if not micro.finite:
                ok = False
                self.monitor.write(f"non-finite loss at step {state.step} ({state.images_seen} images): step skipped")
            self.last_loss = micro.loss
            state.images_seen += micro.size * world
            self.monitor.record_micro_batch(loss=micro.loss, times={"data": data_seconds, **micro.times}, keep=micro.keep)
        stepped, grad_norm, reason = self.training_step.update(ok)
        if not stepped:
            state.skipped_steps += 1
            if reason == "non-finite gradients":
                self.monitor.write(f"non-finite gradients at step {state.step}: step skipped")
        state.step += 1
        if stepped:
            self.ema.update(self.accelerator.unwrap_model(self.module))
            state.ema_updates = self.ema.updates
        self.monitor.record_step(grad_norm=grad_norm, images_seen=state.images_seen, images_delta=state.images_per_step)
        changed = self.threads.update()
        if changed:
            self.monitor.write(f"step {state.step}: {changed}")

    def after_step(self) -> None:
        """Log the window, write a checkpoint and the EMA pipeline, draw a sample grid, as configured."""
        state, tcfg = self.state, self.tcfg
        done = state.images_seen >= tcfg.total_images
        if state.step % tcfg.log_every_steps == 0 or done:  # the last, partial window is logged too
            self.log_window()
        if done or (self.next_checkpoint and state.images_seen >= self.next_checkpoint):
            self.checkpoint()
            self.next_checkpoint = next_multiple(state.images_seen, tcfg.checkpoint_every_images)
        if self.main and (done or (self.next_sample and state.images_seen >= self.next_sample)):
            drawn = sample_grid(self.out / "pipeline", self.held_out, state.images_seen, self.accelerator.device)
            if drawn is not None:
                self.monitor.add_image("samples/ema", drawn[1], state.images_seen)
                self.monitor.write(f"sample grid -> {drawn[0]}")
            self.next_sample = next_multiple(state.images_seen, tcfg.sample_every_images)

    def log_window(self) -> None:
        state = self.state
        scalars = self.monitor.flush(step=state.step, images_seen=state.images_seen, lr=self.lr_scheduler.get_last_lr()[0],
                                     skipped_steps=state.skipped_steps, loader_skipped=self.loader.skipped())
        if "train/loss" in scalars:
            self.losses.append((state.images_seen, scalars["train/loss"]))
            if self.main:  # appended as it goes, so a killed run keeps its curve
                with open(self.loss_log, "a") as handle:
                    handle.write(f"{state.images_seen},{scalars['train/loss']:.6f}\n")

    def checkpoint(self) -> None:
        self.checkpointed_at = self.state.images_seen
        unwrapped = self.accelerator.unwrap_model(self.module)
        save_checkpoint(self.accelerator, self.run_dir.store, self.state, self.ema, self.loader.state_dict(),
                        model=unwrapped)
        if self.main:
            final = self.out / self.published_name
            with stop_on_failed_write(f"the EMA {self.published_name} folder", final, self.run_dir.store):
                if self.upsampler:
                    publish_ema_stage(unwrapped, self.ema, self.cfg, self.noise_scheduler.config, final)
                else:
                    publish_ema_pipeline(unwrapped, self.ema, self.decomposers, self.cfg, self.noise_scheduler.config,
                                         final)

    @property
    def published_name(self) -> str:
        """The EMA folder beside the checkpoints: ``pipeline`` (base) or ``stage`` (an upsampler)."""
        return "stage" if self.upsampler else "pipeline"

    def finish(self, resume: Path | None) -> dict[str, Any]:
        accelerator, state, world = self.accelerator, self.state, self.accelerator.num_processes
        self.monitor.close()
        accelerator.wait_for_everyone()
        digest = parameter_digest(accelerator.unwrap_model(self.module))
        digests = [digest]
        if world > 1:  # every replica must end with the same weights; say so if they do not
            from accelerate.utils import gather_object

            digests = gather_object([digest])
            if len(set(digests)) > 1:
                self.monitor.write(f"WARNING: the {world} replicas ended with different weights (digests {digests})")
        skipped = self.monitor.sum_over_processes(self.loader.skipped())
        summary = {"images_seen": state.images_seen, "step": state.step, "skipped_steps": state.skipped_steps,
                   "last_loss": self.last_loss, "world_size": world, "replica_digests": digests,
                   "loader_skipped": skipped, "resumed_from": str(resume) if resume is not None else None,
                   "session_images": state.images_seen - self.session_images,
                   "session_seconds": round(time.perf_counter() - self.session_start, 1)}
        if self.main:
            write_json_atomic(self.out / "run_summary.json", summary)
        accelerator.end_training()
        return {**summary, "parameter_digest": digest, "pipeline": str(self.out / self.published_name),
                "losses": self.losses}


class GracefulStop:
    """Within the block, SIGTERM and SIGINT (Ctrl-C) only set ``signal_name`` (and ``exit_code``, 128 + the
    signal's number), so the training loop can finish its step and write a checkpoint; the first signal puts the
    previous handlers back, so a second one acts at once. Outside the main thread nothing is installed."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.exit_code = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def handle(self, number: int, frame: Any) -> None:
        import signal

        self.signal_name, self.exit_code = signal.Signals(number).name, 128 + number
        print(f"\n{self.signal_name}: finishing this step and writing a checkpoint (send it again to stop at once)",
              flush=True)
        self.restore()

    def restore(self) -> None:
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def __exit__(self, *exc: Any) -> None:
        self.restore()


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def resolve_memory_format(name: str, device: torch.device | str, mixed_precision: str) -> str:
    """train.memory_format, with "auto" decided: channels_last for bf16 training on a CPU (measured faster
    there with NHWCGroupNorm), contiguous elsewhere (fp32 on AVX2 CPUs was slower in NHWC; GPUs unmeasured)."""
    if name == "auto":
        return "channels_last" if torch.device(device).type == "cpu" and mixed_precision == "bf16" else "contiguous"
    if name not in MEMORY_FORMATS:
        raise ValueError(f"train.memory_format must be auto, {', '.join(MEMORY_FORMATS)}, got {name!r}")
    return name


def apply_memory_format(module: torch.nn.Module, name: str, device: torch.device | str = "cpu",
                        mixed_precision: str = "no") -> str:
    """train.memory_format: the 4-D weights (and so the convs' activations) in NHWC or NCHW, in place; the
    format chosen."""
    name = resolve_memory_format(name, device, mixed_precision)
    module.to(memory_format=MEMORY_FORMATS[name])
    if name == "channels_last":  # the CPU's NHWC GroupNorm backward is ~20x slower than NCHW's in bf16
        use_nhwc_group_norm(module)
    return name


def make_optimizer(module: torch.nn.Module, tcfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the module's parameters; the fused kernel where torch has one for the device (CPU, CUDA)."""
    fused = bool(tcfg.fused_optimizer) and torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(module.parameters(), lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps,
                             weight_decay=tcfg.weight_decay, fused=fused or None)


def stage_kind(cfg: DictConfig) -> str:
    """train.stage, checked: "base", or "upsampler" (whose condition is the low-res crop; local decomposers such
    as sketch may be added: they are decomposed from each high-res crop and enter through the LocalAdapter)."""
    kind = str(cfg.train.stage)
    if kind not in STAGES:
        raise ValueError(f"train.stage must be one of {', '.join(STAGES)}, got {kind!r}")
    return kind


def build_stage_model(cfg: DictConfig, specs) -> torch.nn.Module:
    """The network of the configured stage: the base model on the decomposers' specs, or an upsampler (an sr
    preset with the low-res conditions, sample_size = the training crop)."""
    if cfg.model.pretrained:
        return ComposerUNet.from_pretrained(layout.unet_folder(cfg.model.pretrained))
    if stage_kind(cfg) == "base":
        return build_model(cfg.model, specs)
    crop = int(cfg.data.crop_size or cfg.data.resolution)
    return build_upsampler(cfg.model.preset, crop, int(cfg.train.upsampler.level_dim), dict(cfg.model.overrides or {}),
                           local_specs=stage_local_specs(specs))


def stage_local_specs(specs) -> dict:
    """The decomposers an upsampler run may add: local maps only (sketch, depth, masking, ...), which enter the
    stage through the LocalAdapter; a global or token condition has no place in an unconditional upsampler."""
    bad = [name for name, spec in specs.items() if not spec.is_local or spec.kinds != ("local",)]
    if bad:
        raise ValueError(f"train.stage=upsampler takes only local decomposers (maps such as sketch or depth), not "
                         f"{', '.join(bad)}; remove them from decomposers.enabled")
    return dict(specs)


def publish_ema_stage(module, ema: EMA, cfg: DictConfig, training_config, final: Path) -> Path:
    """Write the EMA upsampler as a stage folder (unet/, scheduler/, stage.json), atomically."""
    import copy

    from omegaconf import OmegaConf

    averaged = copy.deepcopy(module).cpu()
    ema.copy_to(averaged)
    up, sample = cfg.train.upsampler, OmegaConf.to_container(cfg.sample, resolve=True)
    settings = StageSettings(name=up.name, resolution=int(up.resolution), scale=int(up.scale),
                             aug_level=float(up.aug_level), steps=int(sample["steps"]),
                             guidance_scale=float(sample["guidance_scale"]), prediction_type=cfg.train.prediction_type,
                             target=str(up.get("target", "image")), local=list(cfg.decomposers.enabled))
    scheduler = make_scheduler(sample["scheduler"], training_config)
    return layout.write_stage(final, averaged.unet.eval(), scheduler, settings.entry())


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on every rank when the replicas are identical."""
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


def make_denoiser(tcfg: DictConfig, noise_scheduler: DDPMScheduler) -> Denoiser:
    """The parameterisation and loss of a run (train.prediction_type, train.loss_weighting, train.snr_gamma)."""
    return Denoiser(None, NoiseSchedule.from_config(noise_scheduler.config), prediction_type=tcfg.prediction_type,
                    loss_weighting=tcfg.loss_weighting, snr_gamma=tcfg.snr_gamma)


def make_noise_scheduler(tcfg: DictConfig) -> DDPMScheduler:
    """The training noise schedule; saved with the pipeline, so samplers inherit it and its prediction type."""
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


def next_multiple(images_seen: int, every: int) -> int:
    return (images_seen // every + 1) * every if every > 0 else 0
