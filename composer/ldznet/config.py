"""The ``train.ldznet`` section: the LD-ZNet segmentation network a ``train.stage=ldznet`` run trains.

The run also reads data.resolution (the scenes' and the network's size), data.batch_size, seed, output_dir and
the usual train.* settings (lr, warmup_images, total_images, lr_schedule, weight_decay, grad_clip,
mixed_precision, device, checkpoint_every_images, keep_checkpoints, log_every_steps, resume, overwrite).
Scenes are rendered on the fly (composer.ldznet.phrases), so data.shards is not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LDZNetConfig:
    base: str = "assets/demo-model"  # pipeline folder: its frozen base UNet (features) and caption decomposer (text)
    image_only: bool = False  # the paper's baseline: the same network with zeros in place of the diffusion features
    # blocks of the base's diffusers UNet whose outputs are injected (down_blocks.N, mid_block, up_blocks.N)
    blocks: list[str] = field(default_factory=lambda: ["mid_block"])
    timesteps: list[int] = field(default_factory=lambda: [400])  # noise levels (of 1000) the image is noised to
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 96])  # encoder widths per level (64, 32, 16, 8 px)
    attention_dim: int = 64  # width of the attention pools and cross-attentions
    heads: int = 4
    scene_seed: int = 17  # training scenes: scene i of this seed, one phrase each (never 99, the held-out seed)
    validation_seed: int = 98  # scenes for the end-of-run validation (mIoU over one phrase per object)
    validation_scenes: int = 64  # 0: no validation
    dice_weight: float = 1.0  # loss = BCE + dice_weight * soft dice
    noise_seed: int = 0  # the one noise draw prediction noises every image with (saved with the component)
