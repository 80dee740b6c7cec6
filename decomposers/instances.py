"""instances: instance segmentation as a 5-channel map that keeps every instance's shape and category.

Channels: 0-2 a fixed colour code of the category (a deterministic table indexed by class id; 0 for
background), 3 the foreground mask, 4 the instance boundaries (1 where the instance id changes between
neighbouring pixels), so touching instances of the same category stay separable.

Masks come from an ultralytics YOLO segmentation model (v8 / 11 ``-seg``; the paper used v5), or from
precomputed instance-id and class maps (the synthetic scenes' ground truth).

Weights: a ``.safetensors`` file holding the model's state dict, with the model's yaml dict, task and class
names in its metadata (pickle-free: the network is built by ultralytics from the yaml and the tensors are
loaded into it). ``python -m decomposers.instances convert best.pt OUT_DIR`` turns an ultralytics ``.pt``
into that form. A ``.pt`` is a pickle, which runs code when loaded: one given by path in your own training
config still loads (with ultralytics' own loader, after a warning), but one inside a pipeline folder is
refused unless the run passes ``trust_pickle=True`` (``--trust-pickle`` or ``COMPOSER_TRUST_PICKLE=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composer.conditions import LOCAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.paths import TRUST_PICKLE_ENV, resolve_path, trust_pickle_from_env
from decomposers.registry import register_decomposer

NUM_CODES = 1024
CONVERT_HINT = "convert it with `python -m decomposers.instances convert WEIGHTS.pt OUT_DIR`"
YAML_KEY, TASK_KEY, NAMES_KEY = "ultralytics_yaml", "ultralytics_task", "ultralytics_names"


def _ultralytics_env() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")


def save_yolo_safetensors(yolo, path: str | os.PathLike) -> Path:
    """Write an ultralytics YOLO model as a safetensors state dict with its yaml dict, task and class names
    in the metadata; written to a temporary file and renamed, so a failure leaves no partial file."""
    from safetensors.torch import save_file
    from ultralytics.engine.model import Model

    model = yolo.model if isinstance(yolo, Model) else yolo  # the YOLO wrapper or its network
    if not isinstance(getattr(model, "yaml", None), dict):
        raise ValueError("this YOLO model has no yaml dict (an exported or fused model?); convert the training .pt")
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    metadata = {YAML_KEY: json.dumps(model.yaml), TASK_KEY: str(getattr(model, "task", "segment") or "segment"),
                NAMES_KEY: json.dumps({str(k): str(v) for k, v in dict(getattr(model, "names", {}) or {}).items()})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def load_yolo_safetensors(path: str | os.PathLike):
    """An ultralytics YOLO built from the yaml dict in ``path``'s metadata, with its tensors loaded (strict);
    nothing is unpickled."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    _ultralytics_env()
    from ultralytics import YOLO

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except Exception as error:  # SafetensorError for truncated or foreign files
        raise ValueError(f"YOLO weights {path} are not a readable safetensors file ({type(error).__name__}); "
                         f"{CONVERT_HINT}") from None
    if YAML_KEY not in metadata:
        raise ValueError(f"YOLO weights {path} carry no model yaml in their metadata; {CONVERT_HINT}")
    try:
        cfg = json.loads(metadata[YAML_KEY])
        names = {int(k): v for k, v in json.loads(metadata.get(NAMES_KEY, "{}")).items()}
    except (ValueError, TypeError):
        raise ValueError(f"YOLO weights {path} have unreadable metadata; {CONVERT_HINT}") from None
    if not isinstance(cfg, dict) or "backbone" not in cfg or "head" not in cfg:
        raise ValueError(f"YOLO weights {path} carry no model yaml (backbone and head); {CONVERT_HINT}")
    # ultralytics guesses the scale (n/s/m/l/x) from the yaml's file name and would override the stored one:
    # keep only the stored scale so the network has the shapes of the saved tensors.
    scale = cfg.get("scale")
    if scale and isinstance(cfg.get("scales"), dict) and scale in cfg["scales"]:
        cfg["scales"] = {scale: cfg["scales"][scale]}
    cfg.pop("yaml_file", None)
    from ultralytics.utils import YAML

    with tempfile.TemporaryDirectory(prefix="yolo-yaml-") as folder:
        # a file name ultralytics reads the stored scale back from (yolo0n.yaml -> 'n')
        yaml_path = Path(folder) / (f"yolo0{scale}.yaml" if scale and scale in "nslmx" else "model.yaml")
        YAML.save(yaml_path, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yolo = YOLO(str(yaml_path), task=metadata.get(TASK_KEY, "segment"))
    try:
        yolo.model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0][:200]
        raise ValueError(f"YOLO weights {path} do not fit the model their yaml describes ({first}); {CONVERT_HINT}") from None
    if names:
        yolo.model.names = names
    yolo.model.eval()
    return yolo


def convert_yolo(weights: str | os.PathLike, out_dir: str | os.PathLike, *, trust_pickle: bool = False) -> Path:
    """Turn an ultralytics ``.pt`` into OUT_DIR/<stem>.safetensors (see ``save_yolo_safetensors``).

    The ``.pt`` is read with ultralytics' restricted loader (``weights_only=True`` and an allow-list of its
    own model classes), which runs no code from the file; ``trust_pickle`` uses the full pickle loader for
    checkpoints that reference other classes (only for files you trust).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"YOLO weights {weights} not found; give the .pt file to convert")
    _ultralytics_env()
    from ultralytics.nn.tasks import torch_safe_load

    try:
        checkpoint, _ = torch_safe_load(str(weights), safe_only=not trust_pickle)
    except TypeError as error:
        raise ValueError(f"{weights} is not an ultralytics checkpoint its restricted loader accepts "
                         f"({_first_line(error)}); if you trust the file, convert it with --trust-pickle") from None
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"{weights} is not a readable ultralytics checkpoint ({type(error).__name__}: "
                         f"{_first_line(error)})") from None
    model = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{weights} holds no ultralytics model (no 'model' entry); give a YOLO training checkpoint")
    return save_yolo_safetensors(model.float(), Path(out_dir) / f"{weights.stem}.safetensors")


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


def category_codes(num: int = NUM_CODES) -> torch.Tensor:
    """(num, 3) colour code per class id; id 0 (background) is black, others bright and distinct."""
    generator = torch.Generator().manual_seed(20230301)
    codes = 0.25 + 0.75 * torch.rand(num, 3, generator=generator)
    codes[0] = 0
    return codes


def boundaries(ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 on foreground pixels whose 4-neighbourhood holds another id."""
    padded = F.pad(ids.float(), (1, 1, 1, 1), mode="replicate")
    h, w = ids.shape[-2:]
    centre = padded[..., 1 : h + 1, 1 : w + 1]
    edge = torch.zeros_like(centre, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[..., dy : dy + h, dx : dx + w] != centre
    return (edge & (ids > 0)).float()


class keep_threads:
    """Undo what ultralytics does to the process's threads: importing it sets OMP_NUM_THREADS=1 when unset, and
    its device selection calls torch.set_num_threads(min(8, cores - 1)) (1 on a 2-core machine), which left
    every later step of a run (sampling, training) on one thread."""

    def __enter__(self):
        self.threads, self.omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if self.omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = self.omp
        return False


@register_decomposer
class InstancesDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1], instances=None, classes=None) -> (B, 5, H, W).

    With precomputed ``instances`` and ``classes`` ((B, 1, H, W) int, 0 = background, classes = class id +
    1) they are encoded directly; otherwise the YOLO model at ``weights`` runs batched at ``image_size``.
    """

    name = "instances"
    kinds = (LOCAL,)

    def __init__(self, weights: str | None = None, image_size: int = 320, confidence: float = 0.25,
                 source: str = "auto", base_dir: str | None = None, trust_pickle: bool = False):
        super().__init__()
        if not isinstance(image_size, int) or image_size <= 0 or image_size % 32:
            raise ValueError(f"instances image_size must be a positive multiple of 32, got {image_size}")
        option = "decomposers.options.instances.weights"
        self.weights = resolve_path(weights, base_dir, option=option) if weights else None
        self.trust_pickle = bool(trust_pickle) or trust_pickle_from_env()
        if base_dir is not None and self.weights and not self.weights.endswith(".safetensors"):
            if not self.trust_pickle:
                raise ValueError(
                    f"pipeline folder {base_dir} names pickled YOLO weights {weights} (loading a pickle runs any code "
                    f"inside it); {CONVERT_HINT} and point {option} at the .safetensors, or, if you trust the folder, "
                    f"pass --trust-pickle ({TRUST_PICKLE_ENV}=1) for this run")
        self.image_size, self.confidence, self.source = int(image_size), float(confidence), source
        self.register_buffer("codes", category_codes(), persistent=False)
        self._yolo = None

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, 5, resize="nearest")

    def yolo(self):
        with keep_threads():
            return self._load_yolo()

    def _load_yolo(self):
        if self._yolo is None:
            if not self.weights:
                raise ValueError("no YOLO segmentation weights configured; set decomposers.options.instances.weights "
                                 "to a local .pt file (e.g. yolo11n-seg.pt)")
            if not Path(self.weights).is_file():
                raise FileNotFoundError(f"YOLO weights {self.weights} not found; fix decomposers.options.instances.weights")
            if self.weights.endswith(".safetensors"):
                self._yolo = load_yolo_safetensors(self.weights)
            else:
                print(f"instances: loading {self.weights} with ultralytics' own loader (a pickle: it runs code "
                      f"inside the file; use only files you trust; {CONVERT_HINT})", file=sys.stderr)
                _ultralytics_env()
                from ultralytics import YOLO

                self._yolo = YOLO(self.weights, task="segment")
        return self._yolo

    def from_maps(self, instances: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Encode (B, 1, H, W) instance ids and class maps (class id + 1, 0 = background)."""
        classes = classes.long().clamp(0, NUM_CODES - 1)
        code = self.codes.to(classes.device)[classes[:, 0]].permute(0, 3, 1, 2)
        foreground = (instances > 0).float()
        return torch.cat([code * foreground, foreground, boundaries(instances)], dim=1)

    @torch.no_grad()
    def predict_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run YOLO batched; returns (instance ids, class ids + 1), both (B, 1, H, W) int64."""
        b, _, h, w = images.shape
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True).clamp(0, 1)
        model = self.yolo()
        with keep_threads():  # ultralytics' device selection would leave this process on one thread
            results = model.predict(x, conf=self.confidence, verbose=False, retina_masks=True,
                                    imgsz=self.image_size, device=str(images.device))
        ids = torch.zeros(b, 1, self.image_size, self.image_size, dtype=torch.long)
        cls_map = torch.zeros_like(ids)
        for i, result in enumerate(results):
            if result.masks is None or len(result.masks) == 0:
                continue
            masks = result.masks.data.cpu() > 0.5
            if masks.shape[-2:] != (self.image_size, self.image_size):
                masks = F.interpolate(masks[None].float(), size=(self.image_size,) * 2, mode="nearest")[0] > 0.5
            order = torch.argsort(result.boxes.conf.cpu())  # most confident drawn last, on top
            for rank, j in enumerate(order.tolist(), start=1):
                ids[i, 0][masks[j]] = rank
                cls_map[i, 0][masks[j]] = int(result.boxes.cls[j]) + 1
        ids = F.interpolate(ids.float(), size=(h, w), mode="nearest-exact").long()
        cls_map = F.interpolate(cls_map.float(), size=(h, w), mode="nearest-exact").long()
        return ids.to(images.device), cls_map.to(images.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, instances: torch.Tensor | None = None,
                classes: torch.Tensor | None = None, **context: Any) -> torch.Tensor:
        if instances is not None and classes is not None and self.source != "model":
            return self.from_maps(instances.to(images.device), classes.to(images.device))
        if self.source == "precomputed":
            raise ValueError("instances source is 'precomputed' but the batch has no instances/classes maps; "
                             "add them to data.extras or set decomposers.options.instances.source=model")
        return self.from_maps(*self.predict_maps(images))

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """Category colours with white instance boundaries."""
        edge = rep[:, 4:5]
        return (rep[:, :3] * (1 - edge) + edge).clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    """``python -m decomposers.instances convert WEIGHTS.pt OUT_DIR``."""
    parser = argparse.ArgumentParser(prog="python -m decomposers.instances",
                                     description="Convert ultralytics YOLO .pt weights to pickle-free safetensors.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="WEIGHTS.pt -> OUT_DIR/<stem>.safetensors (read without running its code)")
    convert.add_argument("weights")
    convert.add_argument("out_dir")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="read the .pt with the full pickle loader (runs code in the file: only for files you trust)")
    args = parser.parse_args(argv)
    try:
        path = convert_yolo(args.weights, args.out_dir, trust_pickle=args.trust_pickle)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"convert: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {path}; set decomposers.options.instances.weights={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
