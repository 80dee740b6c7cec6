"""Training LD-ZNet's segmentation network on referring phrases of synthetic scenes (train.stage=ldznet).

    composer-diffusion train --config configs/train/ldznet-tiny.yaml      # -> output_dir/ldznet
    composer-diffusion pipeline attach-segmenter assets/demo-model runs/ldznet-tiny/ldznet

One step: the next ``data.batch_size`` scenes of ``train.ldznet.scene_seed`` rendered at data.resolution, one
unique-referring phrase each (composer.ldznet.phrases) -> the phrase's caption embedding from the base's caption
decomposer -> the frozen base UNet's block outputs for the image noised to the chosen levels with the phrase as
its caption (skipped for image_only) -> the network's mask logits -> BCE + dice_weight * soft dice -> AdamW.
Noise draws come from a generator seeded by (seed, images seen), and the data position is the next scene index,
so a resumed run continues exactly as the uninterrupted one. The output_dir is the trainers' (composer.train.rundir):
locked, refused when it holds a run unless --resume / --overwrite; checkpoints are atomic and verified
(composer.train.checkpoint); the component is published atomically to output_dir/ldznet at the end.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from composer.config import save_config
from composer.ldznet.metrics import evaluate_masks, heldout_samples
from composer.ldznet.network import LDZNet, block_names, feature_shapes
from composer.ldznet.phrases import HELDOUT_SEED, referring_batch
from composer.ldznet.segmenter import COMPONENT, Segmenter, component_config, load_base, save_component
from composer.runtime import canonical_precision
from composer.train.checkpoint import STATE_FILE, write_text_atomic
from composer.train.loop import GracefulStop
from composer.train.rundir import RunError, first_nonfinite, open_run, recorded_config
from composer.train.schedule import make_lr_scheduler
from composer.train.seeding import step_generator
from composer.train.state import TrainingState, data_state_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"  # torch.save of plain tensors and numbers, read back with weights_only=True
SCHEDULER_FILE = "scheduler.pt"
LOSSES_FILE = "losses.csv"
SUMMARY_FILE = "run_summary.json"


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, dice_weight: float = 1.0) -> tuple[torch.Tensor, ...]:
    """(loss, bce, dice): mean BCE over pixels + ``dice_weight`` * mean soft dice loss over samples."""
    bce = F.binary_cross_entropy_with_logits(logits, masks)
    probabilities = torch.sigmoid(logits).flatten(1)
    truth = masks.flatten(1)
    dice = 1 - (2 * (probabilities * truth).sum(1) + 1) / (probabilities.sum(1) + truth.sum(1) + 1)
    dice = dice.mean()
    return bce + dice_weight * dice, bce, dice


def check_settings(cfg: DictConfig) -> None:
    """One line for a setting that cannot train (before output_dir is touched)."""
    lcfg = cfg.train.ldznet
    if int(lcfg.scene_seed) == HELDOUT_SEED:
        raise ValueError(f"train.ldznet.scene_seed must not be {HELDOUT_SEED}: those are the held-out scenes of "
                         "scripts/ldznet_eval.py")
    if int(cfg.train.total_images) < 1 or int(cfg.data.batch_size) < 1:
        raise ValueError("train.total_images and data.batch_size must be at least 1")
    if not list(lcfg.blocks) or not list(lcfg.timesteps):
        raise ValueError("train.ldznet.blocks and train.ldznet.timesteps need at least one entry each (the image-only "
                         "network keeps the same shapes)")
    if not Path(lcfg.base).is_dir():
        raise FileNotFoundError(f"train.ldznet.base={lcfg.base} is not a pipeline folder; give e.g. assets/demo-model")
    canonical_precision(cfg.train.mixed_precision)


def train_ldznet(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) an LD-ZNet training as configured; returns the summary the train command prints."""
    check_settings(cfg)
    tcfg = cfg.train
    expected = TrainingState(batch_size=int(cfg.data.batch_size), seed=int(cfg.seed))
    run = open_run(None, cfg.output_dir, resume=tcfg.resume, overwrite=bool(tcfg.get("overwrite", False)),
                   keep=int(tcfg.keep_checkpoints), expected=expected, say=lambda line: print(line, flush=True))
    try:
        return LDZNetTrainer(cfg, run).run()
    finally:
        run.close()


class LDZNetTrainer:
    """One session of an LD-ZNet run."""

    def __init__(self, cfg: DictConfig, run):
        self.cfg, self.tcfg, self.lcfg, self.run_dir = cfg, cfg.train, cfg.train.ldznet, run
        self.out = Path(cfg.output_dir)
        self.last_loss = float("nan")

    def run(self) -> dict[str, Any]:
        # 1. The frozen base, the network, optimiser and schedule
        self.build()
        # 2. Resume from the newest checkpoint that verifies (or start fresh)
        resumed = self.resume()
        save_config(recorded_config(self.cfg), self.out)
        started, start_images = time.time(), self.state.images_seen
        # 3. Train to train.total_images, logging and checkpointing as configured; SIGTERM or Ctrl-C ends the
        #    step under way, writes a checkpoint and stops without publishing (a second signal kills)
        next_checkpoint = self.next_multiple(self.tcfg.checkpoint_every_images)
        with GracefulStop() as stop:
            while self.state.images_seen < self.tcfg.total_images and stop.signal_name is None:
                self.optimizer_step()
                if next_checkpoint and self.state.images_seen >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint = self.next_multiple(self.tcfg.checkpoint_every_images)
            seconds = time.time() - started
            if self.state.images_seen != start_images or not self.run_dir.store.latest():
                self.checkpoint()
        if stop.signal_name is not None:
            print(f"stopped by {stop.signal_name} at {self.state.images_seen} images (step {self.state.step}); "
                  "checkpoint written: continue with the same command and --resume auto", flush=True)
            return {"images_seen": self.state.images_seen, "step": self.state.step, "last_loss": self.last_loss,
                    "skipped_steps": self.state.skipped_steps, "pipeline": "not published (stopped early)",
                    "seconds": round(seconds, 1), "resumed_from": str(resumed) if resumed else None,
                    "stopped_by": stop.signal_name, "exit_code": stop.exit_code}
        # 4. Publish the component, validate it, summarise
        component = self.publish(seconds)
        validation = self.validate()
        summary = {"images_seen": self.state.images_seen, "step": self.state.step, "last_loss": self.last_loss,
                   "skipped_steps": self.state.skipped_steps, "pipeline": str(component), "seconds": round(seconds, 1),
                   "resumed_from": str(resumed) if resumed else None, "validation": validation,
                   "parameters": sum(p.numel() for p in self.network.parameters())}
        write_text_atomic(self.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        if validation:
            print(f"validation on {validation['count']} phrases of seed {self.lcfg.validation_seed}: "
                  f"mIoU {validation['miou']:.3f}, oIoU {validation['oiou']:.3f}", flush=True)
        return summary

    def next_multiple(self, every: int) -> int:
        every = int(every)
        return (self.state.images_seen // every + 1) * every if every > 0 else 0

    # --- 1. build --------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, lcfg, tcfg = self.cfg, self.lcfg, self.tcfg
        self.base = load_base(lcfg.base)
        self.fingerprints = self.base.fingerprints()
        size = int(cfg.data.resolution)
        unknown = [b for b in lcfg.blocks if b not in block_names(self.base.unet)]
        if unknown:
            raise ValueError(f"train.ldznet.blocks {unknown} are not blocks of the base UNet; choose from "
                             f"{', '.join(block_names(self.base.unet))}")
        shapes = feature_shapes(self.base.unet, self.base.schedule, list(lcfg.blocks), size, len(lcfg.timesteps))
        spec = self.base.caption.specs()["caption"]
        torch.manual_seed(int(cfg.seed))
        self.network = LDZNet(image_size=size, widths=list(lcfg.widths), text_dim=spec.dim, token_dim=spec.token_dim,
                              features=shapes, attention_dim=int(lcfg.attention_dim), heads=int(lcfg.heads))
        self.settings = {"blocks": list(lcfg.blocks), "timesteps": [int(t) for t in lcfg.timesteps],
                         "image_only": bool(lcfg.image_only), "noise_seed": int(lcfg.noise_seed)}
        self.segmenter = Segmenter(self.network, self.base, self.settings, device=tcfg.device,
                                   precision=tcfg.mixed_precision)
        self.device = self.segmenter.device
        self.network.train()
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=float(tcfg.lr), betas=tuple(tcfg.adam_betas),
                                           eps=float(tcfg.adam_eps), weight_decay=float(tcfg.weight_decay))
        self.state = TrainingState(batch_size=int(cfg.data.batch_size), seed=int(cfg.seed), extra={"next_scene": 0})
        self.lr_scheduler = make_lr_scheduler(self.optimizer, images_per_step=self.state.images_per_step,
                                              warmup_images=int(tcfg.warmup_images), total_images=int(tcfg.total_images),
                                              schedule=str(tcfg.lr_schedule), min_factor=float(tcfg.min_lr_ratio))
        parameters = sum(p.numel() for p in self.network.parameters())
        what = "image only (zeros for the features)" if lcfg.image_only else \
            f"features of {', '.join(lcfg.blocks)} at t = {', '.join(str(t) for t in lcfg.timesteps)}"
        print(f"LD-ZNet: {parameters / 1e6:.2f} M parameters, {what}; base {lcfg.base}", flush=True)

    # --- 2. resume and checkpoints -----------------------------------------------------------------------------
    def resume(self) -> Path | None:
        def load(path: Path):
            from safetensors.torch import load_file

            self.network.load_state_dict(load_file(path / MODEL_FILE))
            self.optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
            state = TrainingState.from_json((path / STATE_FILE).read_text())
            data = json.loads((path / data_state_file(0)).read_text())
            return state, data

        path, state, data = self.run_dir.load(load, lambda: dict(self.network.state_dict()))
        if path is not None:
            state.extra["next_scene"] = int(data["next_scene"])
            self.state = state
            print(f"resumed from {path} at {state.images_seen} images", flush=True)
        elif (self.out / LOSSES_FILE).exists():
            (self.out / LOSSES_FILE).unlink()  # --resume auto without a checkpoint: a fresh start
        return path

    def checkpoint(self) -> Path:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.network.state_dict().items()}
        bad = first_nonfinite(state)
        if bad is not None:
            raise RunError(f"the weights are not finite ({bad}) at {self.state.images_seen} images; no checkpoint "
                           "written; lower train.lr and resume from the last checkpoint")
        store = self.run_dir.store
        staging = store.staging(self.state.images_seen)
        save_file(state, staging / MODEL_FILE)
        torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
        torch.save(self.lr_scheduler.state_dict(), staging / SCHEDULER_FILE)
        (staging / data_state_file(0)).write_text(json.dumps({"next_scene": self.state.extra["next_scene"]}))
        (staging / STATE_FILE).write_text(self.state.to_json())  # last: marks the folder complete
        return store.commit(staging, self.state.images_seen)

    # --- 3. one step -------------------------------------------------------------------------------------------
    def optimizer_step(self) -> None:
        cfg, tcfg, state = self.cfg, self.tcfg, self.state
        started = time.time()
        images, phrases, masks, next_scene = referring_batch(int(self.lcfg.scene_seed), state.extra["next_scene"],
                                                             int(cfg.data.batch_size), int(cfg.data.resolution))
        images, masks = images.to(self.device), masks.to(self.device)
        generator = step_generator(int(cfg.seed), 0, state.images_seen, self.device)
        logits = self.segmenter.logits(images, phrases, generator=generator)
        loss, bce, dice = segmentation_loss(logits, masks, float(self.lcfg.dice_weight))
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            if float(tcfg.grad_clip) > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), float(tcfg.grad_clip))
                finite = bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        else:
            state.skipped_steps += 1
        self.lr_scheduler.step()
        state.step += 1
        state.images_seen += len(phrases)
        state.extra["next_scene"] = next_scene
        self.last_loss = float(loss.detach())
        if state.step % max(int(tcfg.log_every_steps), 1) == 0 or state.images_seen >= tcfg.total_images:
            self.log(self.last_loss, float(bce.detach()), float(dice.detach()), time.time() - started)

    def log(self, loss: float, bce: float, dice: float, seconds: float) -> None:
        path = self.out / LOSSES_FILE
        new = not path.exists()
        lr = self.optimizer.param_groups[0]["lr"]
        with open(path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["images_seen", "step", "loss", "bce", "dice", "lr", "step_seconds"])
            writer.writerow([self.state.images_seen, self.state.step, f"{loss:.5f}", f"{bce:.5f}", f"{dice:.5f}",
                             f"{lr:.3g}", f"{seconds:.3f}"])
        print(f"images {self.state.images_seen}/{self.tcfg.total_images} step {self.state.step} loss {loss:.4f} "
              f"(bce {bce:.4f}, dice {dice:.4f}) lr {lr:.2e} {seconds:.2f} s/step", flush=True)

    # --- 4. publish and validate -------------------------------------------------------------------------------
    def publish(self, seconds: float) -> Path:
        training = {"images_seen": self.state.images_seen, "steps": self.state.step, "seconds_this_session": round(seconds, 1),
                    "scene_seed": int(self.lcfg.scene_seed), "batch_size": int(self.cfg.data.batch_size),
                    "lr": float(self.tcfg.lr), "seed": int(self.cfg.seed), "last_loss": self.last_loss}
        config = component_config(self.network, self.settings, self.fingerprints, self.lcfg.base, training)
        return save_component(self.out / COMPONENT, self.network, config)

    def validate(self) -> dict[str, float] | None:
        scenes = int(self.lcfg.validation_scenes)
        if scenes <= 0:
            return None
        samples = heldout_samples(int(self.lcfg.validation_seed), scenes, int(self.cfg.data.resolution))
        scores = evaluate_masks(self.segmenter.predict, samples)
        self.network.train()
        return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in scores.items()}
