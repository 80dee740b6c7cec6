"""Configuration of training (owned by composer/train). Lengths and intervals count images seen,
summed over all processes, so a schedule does not change with the batch size or the number of GPUs."""

from __future__ import annotations

from dataclasses import dataclass, field

from composer.ldznet.config import LDZNetConfig
from upsamplers.config import UpsamplerConfig

STAGES = ("base", "upsampler", "ldznet")


@dataclass
class TrainConfig:
    # What the run trains: "base" (the 64 px model on decomposed conditions) or "upsampler" (a cascade stage
    # on crops, its low-res input made from each crop; see the ``upsampler`` section and upsamplers/config.py).
    # An upsampler run publishes a stage folder (output_dir/stage) that layout.attach_stage adds to a pipeline.
    # "ldznet": LD-ZNet's segmentation network on a frozen base's features (the ``ldznet`` section; its own loop,
    # composer.ldznet.train), published as output_dir/ldznet, which composer.ldznet.segmenter attaches.
    stage: str = "base"
    upsampler: UpsamplerConfig = field(default_factory=UpsamplerConfig)
    ldznet: LDZNetConfig = field(default_factory=LDZNetConfig)
    lr: float = 2e-4  # peak AdamW learning rate
    weight_decay: float = 0.01
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (down to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    warmup_images: int = 2_000  # linear learning-rate warm-up, counted in images seen
    total_images: int = 200_000  # training length, counted in images seen
    grad_clip: float = 1.0  # max global gradient norm (0 disables clipping)
    grad_accumulation: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "auto"  # "auto" (bf16 where supported, else fp32), "bf16", "fp16" (GPU only), "no"
    device: str = "auto"  # "auto" (GPU when present), or "cpu" to force the CPU
    # Speed (README "Training speed"; bench/model.py and bench/train.py measure each). memory_format:
    # "auto" (channels_last on a CPU that runs bf16 natively, else contiguous), "contiguous" (NCHW) or
    # "channels_last" (NHWC; every GroupNorm then takes its backward through the NCHW kernel, since torch
    # 2.14's NHWC bf16 GroupNorm backward is ~20x slower: composer.models.groupnorm). On the AVX-512 machine,
    # whole `train` runs of 960 images, A B A B: channels_last took 0.946x the wall time of NCHW (2026-12-03).
    # fused_optimizer: AdamW's fused kernel (CPU and CUDA) instead of a loop over ~400 tensors.
    # compile: torch.compile the UNet (measured here: ~170 s cold, ~8 s warm, ~10 % faster steps; worth it
    # for runs of an hour or more). threads: "auto" takes the cores other processes leave free, re-checked
    # every 25 steps (two runs with 2 threads each on 2 cores collapse to ~1 image/s), or a fixed count.
    memory_format: str = "auto"
    fused_optimizer: bool = True
    compile: bool = False
    threads: str = "auto"
    ema_decay: float = 0.999
    ema_warmup: bool = True  # effective decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    num_train_timesteps: int = 1000  # DDPM noise levels
    beta_schedule: str = "squaredcos_cap_v2"  # DDPM beta schedule ("linear", "scaled_linear", "squaredcos_cap_v2")
    # What the UNet predicts: "epsilon" (the noise) or "v_prediction" (v = sqrt(a) eps - sqrt(1 - a) x0,
    # Salimans & Ho 2022). The epsilon loss weights an x0 error by a / (1 - a), almost nothing at high noise,
    # where the global conditions (caption, image embedding, palette) decide the image; v weights it by
    # 1 / (1 - a) >= 1. Measured: two eps runs (30k and +13k images) learned to ignore all three global conditions.
    prediction_type: str = "v_prediction"
    # Loss weighting over noise levels: "none" (plain MSE on the prediction) or "min_snr" (min-SNR-gamma,
    # Hang et al. 2023: the x0 error weighted by min(SNR, snr_gamma)); see composer.diffusion.denoiser.
    loss_weighting: str = "none"
    snr_gamma: float = 5.0
    # Noise levels drawn in training, as fractions [lo, hi) of num_train_timesteps. SlotDiffusion's ablation:
    # fewer/lower noise levels sharpen slot segmentation and hurt generation; [0, 1] trains every level.
    timestep_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    checkpoint_every_images: int = 20_000  # 0: only at the end
    keep_checkpoints: int = 3  # complete checkpoints kept in output_dir/checkpoints
    log_every_steps: int = 20  # TensorBoard scalars every this many optimizer steps
    sample_every_images: int = 50_000  # EMA sample grid every this many images (0: only at the end)
    sample_images: int = 4  # held-out images per row of the sample grid
    sample_shards: list[str] | None = None  # held-out shards for the grid (default: data.shards, another seed)
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar on the main process
    init_from: str | None = None  # warm start: weights of a checkpoint or pipeline folder (new tensors stay fresh)
    resume: str | None = None  # a checkpoint folder, or "auto" for the newest in output_dir that verifies
    # Start a fresh run in an output_dir that holds one (its checkpoints, losses.csv, pipeline/, samples/ and
    # tensorboard/ are removed first); without it such a start is refused. Never recorded in config.yaml.
    overwrite: bool = False
