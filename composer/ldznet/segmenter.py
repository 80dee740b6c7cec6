"""The LD-ZNet component of a pipeline folder: a segmenter from phrases, saved, loaded and attached.

    segmenter = load_segmenter("assets/demo-model")          # None when the folder has no ldznet/ component
    probabilities = segmenter.predict(images, ["the red striped star"])   # (B, 1, H, W) in [0, 1]

    composer-diffusion pipeline attach-segmenter PIPELINE runs/ldznet-tiny/ldznet   # copy a trained one in

Folder layout (beside unet/, scheduler/, decomposers/ of a pipeline folder; not listed in model_index.json, so
diffusers ignores it and composer.pipelines.layout.publish carries it over when the pipeline is re-saved):

    ldznet/config.json          {"_class_name": "LDZNet", "format": 1, "network": LDZNet's config,
                                 "features": {blocks, timesteps, image_only, noise_seed},
                                 "base": {"unet": fingerprint, "caption": fingerprint, "source": folder}, ...}
    ldznet/ldznet.safetensors   the segmentation network's weights

The network reads the pipeline's own frozen base UNet (features) and caption decomposer (the phrase's
embedding), so a component only loads against the base it was trained on: the fingerprints (sha256 of the
weights as float32) must match, else a clear error. Prediction is deterministic: the image is noised with one fixed
noise draw (from ``noise_seed``) for every image, so a batch gives the same masks as its singles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composer.diffusion.denoiser import NoiseSchedule
from composer.ldznet.network import LDZNet, UNetFeatures
from composer.pipelines import layout
from composer.runtime import autocast, resolve_device, resolve_precision

COMPONENT = "ldznet"  # the component's folder name inside a pipeline folder
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "ldznet.safetensors"
CLASS_NAME = "LDZNet"
FORMAT = 1


def tensor_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors as float32, in key order (independent of the file they came from)."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        tensor = value.detach().cpu()
        digest.update((tensor.float() if tensor.is_floating_point() else tensor).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class BaseModel:
    """What LD-ZNet reads from a pipeline folder: the frozen base UNet, its noise schedule and caption decomposer."""

    folder: Path
    unet: Any  # ComposerUNet, frozen
    caption: Any  # DecomposerSet with the caption decomposer only
    schedule: NoiseSchedule

    def fingerprints(self) -> dict[str, str]:
        return {"unet": tensor_fingerprint(self.unet), "caption": tensor_fingerprint(self.caption)}

    def to(self, device: torch.device) -> BaseModel:
        self.unet.to(device)
        self.caption.to(device)
        return self

    def text(self, phrases: list[str], device: torch.device):
        """The phrases' caption Conditions (B samples) on ``device``."""
        if any(not isinstance(p, str) or not p.strip() for p in phrases):
            raise ValueError(f"every phrase must be a non-empty string, got {phrases!r}")
        return self.caption.decompose(torch.zeros(len(phrases), 3, 1, 1, device=device), captions=list(phrases))


def load_base(folder: str | os.PathLike) -> BaseModel:
    """The frozen base of a pipeline folder (its unet/, scheduler/ and caption decomposer), on the CPU."""
    from composer.models.unet import ComposerUNet
    from decomposers.folder import read_config
    from decomposers.set import DecomposerSet

    folder = Path(folder)
    layout.read_index(folder)
    unet = ComposerUNet.from_pretrained(layout.unet_folder(folder)).eval().requires_grad_(False)
    if "caption" not in unet.specs:
        raise ValueError(f"the base UNet of {folder} takes no caption; LD-ZNet needs a caption-conditioned base")
    config = read_config(folder / "decomposers")
    if "caption" not in (config.get("enabled") or []):
        raise ValueError(f"{folder}/decomposers has no caption decomposer; LD-ZNet embeds phrases with it")
    options = dict((config.get("options") or {}).get("caption") or {})
    caption = DecomposerSet(["caption"], {"caption": options}, base_dir=folder)
    caption.eval().requires_grad_(False)
    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder}/scheduler/scheduler_config.json is missing or damaged ({type(error).__name__})") from None
    return BaseModel(folder, unet, caption, NoiseSchedule.from_config(scheduler_config))


class Segmenter:
    """Masks from phrases: the LD-ZNet network over a pipeline's frozen base.

    settings: {"blocks": [...], "timesteps": [...], "image_only": bool, "noise_seed": int}.
    """

    def __init__(self, network: LDZNet, base: BaseModel, settings: dict[str, Any], *, device: str = "auto",
                 precision: str = "auto"):
        self.device = resolve_device(device)
        resolve_precision(precision, self.device)  # an impossible precision fails here
        self.precision = precision
        self.network = network.to(self.device)
        self.base = base.to(self.device)
        self.settings = dict(settings)
        self.image_size = int(network.config["image_size"])
        self.features = None if self.settings["image_only"] else UNetFeatures(
            base.unet, base.schedule, blocks=self.settings["blocks"], timesteps=self.settings["timesteps"])

    def logits(self, images: torch.Tensor, phrases: list[str], *, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits (B, 1, S, S) float32 for images (B, 3, S, S) in [0, 1] at the network's size S (with
        gradients for the network; the base runs under no_grad). Noise: ``noise`` (T * B, 3, S, S) or drawn."""
        conditions = self.base.text(phrases, images.device)
        with autocast(self.precision, images.device):
            maps = None if self.features is None else self.features(images, conditions, generator=generator, noise=noise)
            logits = self.network(images, conditions["caption"], maps)
        return logits.float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, phrases: list[str], *, batch_size: int = 32) -> torch.Tensor:
        """The probability that each pixel belongs to the phrase's object.

        images: (B, 3, H, W) float in [0, 1] (any size: segmented at the network's size, then resized back);
        phrases: B strings. Returns (B, 1, H, W) float32 in [0, 1].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(phrases) != images.shape[0]:
            raise ValueError(f"got {len(phrases)} phrases for {images.shape[0]} images")
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("images must be finite and in [0, 1]")
        was_training = self.network.training
        self.network.eval()
        height, width = images.shape[-2:]
        size = self.image_size
        small = images.float().to(self.device)
        if (height, width) != (size, size):
            small = F.interpolate(small, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        noise = self.fixed_noise()
        out = []
        for start in range(0, len(phrases), batch_size):
            chunk = small[start:start + batch_size]
            levels = len(self.settings["timesteps"])
            chunk_noise = noise[:, None].expand(levels, len(chunk), *noise.shape[1:]).reshape(-1, *noise.shape[1:])
            out.append(torch.sigmoid(self.logits(chunk, list(phrases[start:start + batch_size]), noise=chunk_noise)))
        self.network.train(was_training)
        probabilities = torch.cat(out)
        if (height, width) != (size, size):
            probabilities = F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)
        return probabilities.clamp(0, 1).cpu()

    def fixed_noise(self) -> torch.Tensor:
        """(T, 3, S, S): the one noise draw per level every predicted image is noised with."""
        generator = torch.Generator().manual_seed(int(self.settings.get("noise_seed", 0)))
        levels = len(self.settings["timesteps"])
        return torch.randn(levels, 3, self.image_size, self.image_size, generator=generator).to(self.device)


# --- the folder ------------------------------------------------------------------------------------------------

def component_config(network: LDZNet, settings: dict[str, Any], fingerprints: dict[str, str], source: str,
                     training: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"_class_name": CLASS_NAME, "format": FORMAT, "network": network.config,
            "features": {k: settings[k] for k in ("blocks", "timesteps", "image_only", "noise_seed")},
            "base": {**fingerprints, "source": str(source)}, "training": training or {}}


def save_component(final: str | os.PathLike, network: LDZNet, config: dict[str, Any]) -> Path:
    """Write the component folder ``final`` (config.json + ldznet.safetensors) atomically (staged, fsynced, swapped)."""
    from safetensors.torch import save_file

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f"{final.name}{layout.STAGING_MARK}{os.getpid()}-{int(time.time() * 1000)}")
    try:
        staging.mkdir()
        state = {k: v.detach().float().contiguous().cpu() for k, v in network.state_dict().items()}
        save_file(state, staging / WEIGHTS_NAME)
        os.chmod(staging / WEIGHTS_NAME, 0o644)  # safetensors writes through a private temporary file
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        layout.swap_in(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def read_component(folder: str | os.PathLike) -> tuple[LDZNet, dict[str, Any]]:
    """(network with its weights, config) of a component folder; ValueError naming the folder when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        if config.get("_class_name") != CLASS_NAME:
            raise KeyError("_class_name")
        network = LDZNet(**config["network"])
        features = config["features"]
        settings = {"blocks": list(features["blocks"]), "timesteps": [int(t) for t in features["timesteps"]],
                    "image_only": bool(features["image_only"]), "noise_seed": int(features.get("noise_seed", 0))}
        config["features"] = settings
    except FileNotFoundError:
        raise ValueError(f"the LD-ZNet component {folder} is damaged: no {CONFIG_NAME}; attach it again") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"the LD-ZNet component {folder} is damaged: {CONFIG_NAME} is not an LD-ZNet config "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:160]}); attach it again") from None
    try:
        state = load_file(folder / WEIGHTS_NAME)
    except FileNotFoundError:
        raise ValueError(f"the LD-ZNet component {folder} is damaged: no {WEIGHTS_NAME}; attach it again") from None
    except (SafetensorError, OSError) as error:
        raise ValueError(f"the LD-ZNet component {folder} is damaged: {WEIGHTS_NAME} is unreadable "
                         f"({' '.join(str(error).split())[:160]}); attach it again") from None
    own = network.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"the LD-ZNet component {folder} is damaged: its weights do not fit its config "
                         f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); attach it again")
    network.load_state_dict(state)
    return network.eval(), config


def check_base(config: dict[str, Any], base: BaseModel, component: Path) -> None:
    """The component was trained on this base's features and caption embeddings (fingerprints agree)."""
    own = base.fingerprints()
    needed = ["caption"] if config["features"]["image_only"] else ["unet", "caption"]
    differ = [k for k in needed if config["base"].get(k) != own[k]]
    if differ:
        raise ValueError(f"the LD-ZNet component {component} was trained on another base model ({' and '.join(differ)} "
                         f"of {base.folder} differ; it was trained on {config['base'].get('source', '?')}); retrain it "
                         f"with train.ldznet.base={base.folder}")


def load_segmenter(folder: str | os.PathLike, *, component: str | os.PathLike | None = None, device: str = "auto",
                   precision: str = "auto") -> Segmenter | None:
    """The Segmenter of a pipeline folder, or None when it has no ldznet/ component.

    component: a component folder to use with this pipeline's base instead (e.g. a training run's
    output_dir/ldznet); it must exist. Raises ValueError when the component is damaged or belongs to another base.
    """
    folder = Path(folder)
    layout.read_index(folder)
    path = Path(component) if component is not None else folder / COMPONENT
    if component is None and not path.exists():
        return None
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not an LD-ZNet component folder (train one with "
                                "`composer-diffusion train --config configs/train/ldznet-tiny.yaml`)")
    network, config = read_component(path)
    base = load_base(folder)
    check_base(config, base, path)
    return Segmenter(network, base, config["features"], device=device, precision=precision)


def attach_segmenter(pipeline: str | os.PathLike, component: str | os.PathLike) -> Path:
    """Copy a trained component into ``pipeline``/ldznet atomically, after checking it fits that pipeline's base."""
    pipeline, component = Path(pipeline), Path(component)
    load_segmenter(pipeline, component=component, device="cpu", precision="fp32")
    final = pipeline / COMPONENT
    staging = final.with_name(f"{final.name}{layout.STAGING_MARK}{os.getpid()}-{int(time.time() * 1000)}")
    try:
        staging.mkdir()
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(component / name, staging / name)
        layout.swap_in(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


USAGE = "usage: python -m composer.ldznet.segmenter attach PIPELINE COMPONENT_FOLDER"

if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if len(args) != 3 or args[0] != "attach":
        sys.exit(USAGE)
    try:
        print(attach_segmenter(args[1], args[2]))
    except (OSError, ValueError) as error:
        sys.exit(f"error: {' '.join(str(error).split())}")
