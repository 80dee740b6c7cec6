"""Contrastive training of a small open_clip CLIP on the synthetic scenes (the demo's caption encoder).

The project's embedded demo conditions on captions and CLIP image embeddings, and this machine class cannot
download a pretrained CLIP, so the repository ships one trained here on procedurally generated scenes
(composer/data/scenes.py): an open_clip ``CLIP`` built from a JSON model config
(configs/clip/scene-clip-tiny.json), trained with open_clip's ``ClipLoss``, and saved as a plain open_clip
state dict in safetensors, so ``open_clip.create_model(name, pretrained=path)`` loads it like any other.

Data: scene ``i`` of seed ``train_seed`` for ``i < train_scenes`` (a fixed pool, rendered once, optionally
cached as an .npz), batches drawn by a per-epoch permutation seeded from (seed, epoch), so a resumed run
sees exactly the batches an uninterrupted one would. Evaluation uses scenes of a different seed.

Images enter the model as CLIP expects: (B, 3, S, S) in [0, 1], normalised with the model's mean and std
(the same preprocessing as decomposers/image_embedding.py at S = the model's image size).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from composer.data.scenes import COLOURS, SHAPES, SIZES, TEXTURE_WORDS, generate_scene

STATE_FILE = "training_state.safetensors"
HISTORY_FILE = "history.jsonl"


@dataclass
class SceneClipConfig:
    """Everything one training run depends on (saved next to its checkpoint)."""

    model_name: str = "scene-clip-tiny"
    model_config_file: str = "configs/clip/scene-clip-tiny.json"
    image_size: int = 64
    train_seed: int = 0
    train_scenes: int = 32768
    eval_seed: int = 1_000_003  # held-out scenes come from a different seed
    eval_scenes: int = 256
    probe_scenes: int = 512
    batch_size: int = 256
    steps: int = 600
    learning_rate: float = 1e-3
    min_learning_rate: float = 1e-5
    warmup_steps: int = 40
    weight_decay: float = 0.1
    seed: int = 0
    threads: int | None = None  # torch threads; None leaves torch's setting
    bf16: bool = True  # bf16 autocast (fast on CPUs with native bf16; never fp16 on a CPU)
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 50
    scene_cache: str | None = None  # .npz cache of the rendered training pool


@dataclass
class SceneSet:
    """Rendered scenes: images (N, 3, S, S) uint8, captions, and each scene's metadata."""

    images: torch.Tensor
    captions: list[str]
    metas: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


# --- data -------------------------------------------------------------------------------------------


def render_scenes(seed: int, count: int, size: int = 64, start: int = 0) -> SceneSet:
    """Scenes ``start .. start + count - 1`` of ``seed`` at ``size`` px (about 3.5 ms each at 64 px)."""
    images = torch.empty(count, 3, size, size, dtype=torch.uint8)
    captions, metas = [], []
    for offset in range(count):
        scene = generate_scene(seed, start + offset, size)
        pixels = np.round(scene.image * 255.0).astype(np.uint8)
        images[offset] = torch.from_numpy(pixels).permute(2, 0, 1)
        captions.append(scene.caption)
        metas.append(scene.meta)
    return SceneSet(images, captions, metas)


def load_or_render_scenes(seed: int, count: int, size: int, cache: str | os.PathLike | None = None) -> SceneSet:
    """``render_scenes`` with an optional .npz cache keyed by (seed, count, size); metadata is not cached."""
    if cache is None:
        return render_scenes(seed, count, size)
    path = Path(cache)
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if tuple(int(v) for v in data["key"]) == (seed, count, size):
                return SceneSet(torch.from_numpy(data["images"]), [str(c) for c in data["captions"]])
    scenes = render_scenes(seed, count, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, key=np.array([seed, count, size]), images=scenes.images.numpy(),
             captions=np.array(scenes.captions))
    os.replace(temporary, path)
    return scenes


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> torch.Tensor:
    """Scene indices of training step ``step``: epochs are permutations seeded from (seed, epoch), the last
    partial batch of an epoch is dropped, so no batch holds a scene twice."""
    per_epoch = count // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch size {batch_size} is larger than the {count} training scenes; lower the batch size")
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
    permutation = torch.randperm(count, generator=generator)
    return permutation[position * batch_size : (position + 1) * batch_size]


# --- model ------------------------------------------------------------------------------------------


def register_model_config(model_config_file: str | os.PathLike) -> str:
    """Register an open_clip model JSON config; returns the model name (the file's stem)."""
    import open_clip

    path = Path(model_config_file)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {path} not found; pass an existing JSON file")
    open_clip.add_model_config(path)
    return path.stem


def load_scene_clip(weights: str | os.PathLike, model_config_file: str | os.PathLike,
                    model_name: str | None = None) -> torch.nn.Module:
    """The shipped (or any saved) scene CLIP through open_clip's own loader, in eval mode, fp32."""
    import open_clip

    name = register_model_config(model_config_file)
    if not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP checkpoint {weights} not found; train one with scripts/train_scene_clip.py")
    model = open_clip.create_model(model_name or name, pretrained=str(weights), load_weights=True)
    return model.eval()


def image_inputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) or float in [0, 1] -> the model's normalised input, resized if S differs."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"], dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (unnormalised, (B, D)) computed only up to the longest caption.

    The text transformer is causal, so hidden states up to the end token ignore the padding after it: the
    result equals open_clip's ``encode_text`` while doing 2-4x less work on these captions.
    """
    from open_clip.transformer import text_global_pool

    length = int(tokens.argmax(dim=-1).max()) + 1  # the end token has the largest id
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


@torch.no_grad()
def embed(model: torch.nn.Module, tokenizer: Callable, images: torch.Tensor, captions: Sequence[str],
          batch_size: int = 256, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image (N, D) and text (N, D) features, float32."""
    image_features, text_features = [], []
    for begin in range(0, len(captions), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image_features.append(model.encode_image(image_inputs(model, images[begin : begin + batch_size])).float())
            tokens = tokenizer(list(captions[begin : begin + batch_size]))
            text_features.append(encode_text_trimmed(model, tokens).float())
    return F.normalize(torch.cat(image_features), dim=-1), F.normalize(torch.cat(text_features), dim=-1)


# --- evaluation -------------------------------------------------------------------------------------


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, captions: Sequence[str],
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k text->image and image->text accuracy over N pairs (features (N, D), normalised).

    A retrieved item counts as correct when its caption equals the query's (identical captions are
    indistinguishable by definition). Chance top-1 is about 1/N.
    """
    similarity = image_features @ text_features.T  # (N images, N texts)
    ids = {caption: i for i, caption in enumerate(captions)}
    labels = torch.tensor([ids[c] for c in captions])
    same = labels[:, None] == labels[None, :]
    metrics = {}
    for k in ks:
        k_eff = min(k, len(captions))
        text_to_image = similarity.T.topk(k_eff, dim=1).indices  # each text's best images
        image_to_text = similarity.topk(k_eff, dim=1).indices
        metrics[f"text_to_image_top{k}"] = same.gather(1, text_to_image).any(dim=1).float().mean().item()
        metrics[f"image_to_text_top{k}"] = same.gather(1, image_to_text).any(dim=1).float().mean().item()
    return metrics


def _phrase(obj: dict[str, Any], **change: str) -> str:
    words = {"size": obj["size"], "colour": obj["colour"], "texture": TEXTURE_WORDS[obj["texture"]], "class": obj["class"]}
    words.update(change)
    return f"a {words['size']} {words['colour']} {words['texture']} {words['class']} at"


def swapped_caption(caption: str, meta: dict[str, Any], kind: str, rng: np.random.Generator) -> str | None:
    """The caption with one attribute of one object changed, or None when the scene does not allow it.

    kind: "colour", "shape", "size" or "texture" (one object's word replaced by another value of that
    attribute), or "binding" (the colours of two differently coloured objects exchanged: the same words
    in another arrangement, so only a model that binds colours to objects can tell them apart).
    """
    objects = meta["objects"]
    if kind == "binding":
        pairs = [(a, b) for a in objects for b in objects if a["instance_id"] < b["instance_id"] and a["colour"] != b["colour"]]
        if not pairs:
            return None
        first, second = pairs[int(rng.integers(len(pairs)))]
        changes = [(first, {"colour": second["colour"]}), (second, {"colour": first["colour"]})]
    else:
        attribute, values = {
            "colour": ("colour", list(COLOURS)),
            "shape": ("class", list(SHAPES)),
            "size": ("size", list(SIZES)),
            "texture": ("texture", list(TEXTURE_WORDS.values())),
        }[kind]
        target = objects[int(rng.integers(len(objects)))]
        current = TEXTURE_WORDS[target["texture"]] if kind == "texture" else target[attribute]
        others = [v for v in values if v != current]
        changes = [(target, {attribute: others[int(rng.integers(len(others)))]})]
    result = caption
    for obj, _ in changes:  # replace each phrase once, through placeholders so swaps do not collide
        old = _phrase(obj)
        if result.count(old) != 1:
            return None
        result = result.replace(old, f"\0{obj['instance_id']}\0")
    for obj, change in changes:
        result = result.replace(f"\0{obj['instance_id']}\0", _phrase(obj, **change))
    return result if result != caption else None


@torch.no_grad()
def attribute_probes(model: torch.nn.Module, tokenizer: Callable, scenes: SceneSet,
                     kinds: Sequence[str] = ("colour", "shape", "size", "texture", "binding"),
                     seed: int = 0) -> dict[str, float]:
    """For each kind, the fraction of scenes whose image is closer to its true caption than to the same
    caption with one attribute changed (see ``swapped_caption``); chance is 0.5."""
    rng = np.random.default_rng(seed)
    image_features, true_features = embed(model, tokenizer, scenes.images, scenes.captions)
    results = {}
    for kind in kinds:
        rows, swapped = [], []
        for i, (caption, meta) in enumerate(zip(scenes.captions, scenes.metas)):
            changed = swapped_caption(caption, meta, kind, rng)
            if changed is not None:
                rows.append(i)
                swapped.append(changed)
        if not rows:
            continue
        index = torch.tensor(rows)
        _, swapped_features = embed(model, tokenizer, scenes.images[index], swapped)
        true_score = (image_features[index] * true_features[index]).sum(-1)
        swapped_score = (image_features[index] * swapped_features).sum(-1)
        results[f"probe_{kind}"] = (true_score > swapped_score).float().mean().item()
    return results


# --- checkpoints ------------------------------------------------------------------------------------


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def export_weights(model: torch.nn.Module, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Save the model's open_clip state dict as safetensors (cast to ``dtype`` for a small file), atomically."""
    state = {name: (t.to(dtype) if t.is_floating_point() else t) for name, t in model.state_dict().items()}
    _atomic_save(state, Path(path), metadata={"format": "pt", "producer": "composer.train.scene_clip"})


def save_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                        config: SceneClipConfig) -> None:
    """Model weights (fp32) and AdamW moments in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                tensors[f"optimizer.{names[id(parameter)]}.{key}"] = torch.as_tensor(value).float()
    _atomic_save(tensors, directory / STATE_FILE, metadata={"step": str(step), "config": json.dumps(asdict(config))})


def load_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore what ``save_training_state`` wrote; returns the step to continue from (0 when none)."""
    from safetensors import safe_open

    path = directory / STATE_FILE
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["step"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, parameter in model.named_parameters():
        state = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                 if key.startswith(f"optimizer.{name}.") and key.count(".") == name.count(".") + 2}
        if state:
            state["step"] = state["step"].reshape(())
            optimizer.state[parameter] = state
    return step


# --- training ---------------------------------------------------------------------------------------


def learning_rate_at(step: int, config: SceneClipConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_learning_rate`` at ``steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine


def _optimizer(model: torch.nn.Module, config: SceneClipConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings and the logit scale (as open_clip trains)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        exempt = parameter.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding")
        (no_decay if exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.98), eps=1e-6, fused=True)


def build_scene_clip(config: SceneClipConfig) -> tuple[torch.nn.Module, Callable]:
    """A freshly initialised (seeded by ``config.seed``) open_clip model and its tokenizer."""
    import open_clip

    name = register_model_config(config.model_config_file)
    if name != config.model_name:
        raise ValueError(f"model config file {config.model_config_file} defines {name!r}, not {config.model_name!r}; "
                         "name the file after the model")
    torch.manual_seed(config.seed)
    return open_clip.create_model(name, pretrained=None), open_clip.get_tokenizer(name)


def contrastive_loss(model: torch.nn.Module, tokenizer: Callable, scenes: SceneSet) -> float:
    """open_clip's ClipLoss over all of ``scenes`` as one batch, fp32, no gradient."""
    import open_clip

    image_features, text_features = embed(model, tokenizer, scenes.images, scenes.captions, batch_size=len(scenes))
    with torch.no_grad():
        return open_clip.ClipLoss()(image_features, text_features, model.logit_scale.exp()).item()


def train_scene_clip(config: SceneClipConfig, output_dir: str | os.PathLike, *,
                     train_set: SceneSet | None = None, eval_set: SceneSet | None = None,
                     log: Callable[[str], None] = print, stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) a scene CLIP; returns {"history": [...], "metrics": {...}, "model": module}.

    ``output_dir`` receives ``training_state.safetensors`` (every ``checkpoint_every`` steps and at the end:
    model + optimizer, atomic, resumed from automatically), ``history.jsonl`` and ``config.json``.
    ``train_set`` / ``eval_set`` replace the rendered scene pools (tests pass tiny ones). ``stop_after``
    ends the run early at that step, after saving a checkpoint (as if it had been interrupted there).
    """
    import open_clip

    # 1. Start the run: config.json, the seeded model and its optimizer, restored from a checkpoint if any
    if config.threads:
        torch.set_num_threads(config.threads)
    output = Path(output_dir)
    model, tokenizer, optimizer, start = _start_run(config, output, log)
    loss_function = open_clip.ClipLoss()
    # 2. The scene pools
    began = time.time()
    train_set, eval_set = _scene_pools(config, train_set, eval_set, log, began)
    tokens = tokenizer(train_set.captions)
    # 3. Train: log every log_every steps, evaluate every eval_every, checkpoint every checkpoint_every
    history: list[dict[str, Any]] = []
    running, running_count, step_began = 0.0, 0, time.time()
    for step in range(start, config.steps):
        running += _train_step(model, optimizer, loss_function, train_set.images, tokens, step, config)
        running_count += 1
        done = step + 1
        record: dict[str, Any] = {}
        if done % config.log_every == 0 or done == config.steps:
            record = {"step": done, "loss": running / running_count, "lr": optimizer.param_groups[0]["lr"],
                      "logit_scale": model.logit_scale.exp().item(),
                      "seconds_per_step": (time.time() - step_began) / running_count,
                      "elapsed": time.time() - began}
            running, running_count, step_began = 0.0, 0, time.time()
        if done % config.eval_every == 0 or done == config.steps:
            model.eval()
            record.update({"step": done, **_retrieval(model, tokenizer, eval_set, config.eval_scenes, config.bf16)})
            model.train()
        if record:
            history.append(record)
            _write_record(output / HISTORY_FILE, record, log)
        if done % config.checkpoint_every == 0 or done in (config.steps, stop_after):
            save_training_state(output, model, optimizer, done, config)
        if done == stop_after:
            break
    # 4. Final retrieval and attribute probes on the held-out scenes
    model.eval()
    metrics = _final_metrics(model, tokenizer, eval_set, config)
    metrics["train_seconds"] = time.time() - began
    return {"history": history, "metrics": metrics, "model": model}


def _start_run(config: SceneClipConfig, output: Path,
               log: Callable[[str], None]) -> tuple[torch.nn.Module, Callable, torch.optim.Optimizer, int]:
    """Write config.json; a fresh model (train mode) and optimizer, restored from ``output``'s checkpoint if any;
    returns them with the step to continue from."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    model, tokenizer = build_scene_clip(config)
    model.train()
    optimizer = _optimizer(model, config)
    start = load_training_state(output, model, optimizer)
    if start:
        log(f"resumed from step {start}")
    return model, tokenizer, optimizer, start


def _scene_pools(config: SceneClipConfig, train_set: SceneSet | None, eval_set: SceneSet | None,
                 log: Callable[[str], None], began: float) -> tuple[SceneSet, SceneSet]:
    """The given sets, or the configured training pool (cached) and held-out scenes rendered now."""
    if train_set is None:
        train_set = load_or_render_scenes(config.train_seed, config.train_scenes, config.image_size, config.scene_cache)
        log(f"training pool: {len(train_set)} scenes (seed {config.train_seed}) in {time.time() - began:.0f} s")
    if eval_set is None:
        eval_set = render_scenes(config.eval_seed, max(config.eval_scenes, config.probe_scenes), config.image_size)
    return train_set, eval_set


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: Callable,
                images: torch.Tensor, tokens: torch.Tensor, step: int, config: SceneClipConfig) -> float:
    """One optimizer update on the batch of ``step`` at its scheduled learning rate; returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, config)
    index = batch_indices(step, config.batch_size, len(tokens), config.seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        image_features = model.encode_image(image_inputs(model, images[index]), normalize=True)
        text_features = F.normalize(encode_text_trimmed(model, tokens[index]), dim=-1)
        loss = loss_function(image_features.float(), text_features.float(), model.logit_scale.exp())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def _retrieval(model: torch.nn.Module, tokenizer: Callable, scenes: SceneSet, count: int,
               bf16: bool = False) -> dict[str, float]:
    """``retrieval_metrics`` over the first ``count`` scenes."""
    features = embed(model, tokenizer, scenes.images[:count], scenes.captions[:count], bf16=bf16)
    return retrieval_metrics(*features, scenes.captions[:count])


def _write_record(path: Path, record: dict[str, Any], log: Callable[[str], None]) -> None:
    """Append one history record to ``path`` (JSON lines) and log it on one line."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def _final_metrics(model: torch.nn.Module, tokenizer: Callable, eval_set: SceneSet,
                   config: SceneClipConfig) -> dict[str, Any]:
    """Retrieval (fp32) and, with ``probe_scenes``, the attribute probes; none when the scenes have no metadata."""
    metrics: dict[str, Any] = {}
    if eval_set.metas:
        metrics.update(_retrieval(model, tokenizer, eval_set, config.eval_scenes))
        if config.probe_scenes > 0:
            probe_set = SceneSet(eval_set.images[: config.probe_scenes], eval_set.captions[: config.probe_scenes],
                                 eval_set.metas[: config.probe_scenes])
            metrics.update(attribute_probes(model, tokenizer, probe_set, seed=config.seed))
    return metrics


def evaluate_scene_clip(model: torch.nn.Module, tokenizer: Callable, seed: int = 1_000_003, count: int = 256,
                        probe_count: int = 512, size: int = 64) -> dict[str, float]:
    """Retrieval over ``count`` held-out scenes of ``seed`` plus the attribute probes over ``probe_count``."""
    scenes = render_scenes(seed, max(count, probe_count), size)
    features = embed(model, tokenizer, scenes.images[:count], scenes.captions[:count])
    metrics = retrieval_metrics(*features, scenes.captions[:count])
    probe_set = SceneSet(scenes.images[:probe_count], scenes.captions[:probe_count], scenes.metas[:probe_count])
    metrics.update(attribute_probes(model, tokenizer, probe_set))
    return metrics
