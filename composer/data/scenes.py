"""Procedural multi-object 2.5D scenes: the project's embedded default dataset.

Each scene has 1 to 6 objects (10 shape classes, 12 named colours, 3 sizes, 4 textures) at different
depths, painted far to near so nearer objects occlude farther ones, on a flat, gradient or floor-and-sky
background. Rendering is anti-aliased by supersampling every object's coverage and texture inside its
bounding box and area-averaging, so any size from 64 to 1024 px works.

Ground truth comes from the same coverage masks as the pixels:
- instances: the id of the nearest object whose coverage of the pixel is >= 0.5 (0 = background);
- classes: that object's class index + 1 (0 = background);
- depth: in [0, 1], larger = farther; objects are flat cut-outs at their own depth, the background is 1
  except a floor, whose depth grows from the bottom edge to the horizon. On floor scenes an object stands
  at the floor depth of its bottom edge, so depth agrees with occlusion everywhere.
Objects left less than 30 % visible (or a handful of pixels) are removed before the final render, so every
object in the caption and the metadata is visible.

Scene ``index`` of a run with ``seed`` draws from ``numpy.random.SeedSequence([seed, index])``: any scene can
be regenerated alone, and the same (seed, index, size) always gives identical arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SHAPES = ("circle", "ellipse", "square", "diamond", "triangle", "hexagon", "star", "cross", "heart", "ring")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.97, 0.55, 0.08),
    "yellow": (0.96, 0.87, 0.15),
    "green": (0.16, 0.66, 0.22),
    "teal": (0.05, 0.62, 0.62),
    "blue": (0.13, 0.30, 0.88),
    "purple": (0.52, 0.20, 0.74),
    "pink": (0.96, 0.47, 0.72),
    "brown": (0.50, 0.30, 0.13),
    "white": (0.97, 0.97, 0.97),
    "black": (0.07, 0.07, 0.07),
    "grey": (0.55, 0.55, 0.55),
}
SIZES: dict[str, float] = {"small": 0.10, "medium": 0.145, "large": 0.20}  # radius as a fraction of the side
TEXTURES = ("solid", "stripes", "checks", "gradient")
TEXTURE_WORDS = {"solid": "solid", "stripes": "striped", "checks": "checkered", "gradient": "gradient"}
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "beige": (0.86, 0.80, 0.66),
    "light grey": (0.78, 0.78, 0.78),
    "dark grey": (0.28, 0.29, 0.31),
    "pale blue": (0.68, 0.80, 0.92),
    "pale green": (0.72, 0.85, 0.70),
    "cream": (0.95, 0.92, 0.82),
}
BACKGROUND_KINDS = ("flat", "gradient", "floor")
MIN_VISIBLE_FRACTION = 0.3


@dataclass
class Scene:
    """One rendered scene.

    image: (H, W, 3) float32 in [0, 1]; instances: (H, W) int32, 0 = background, 1..n objects;
    classes: (H, W) uint8, 0 = background else class index + 1; depth: (H, W) float32 in [0, 1],
    larger = farther; caption: text naming every object; meta: JSON-serialisable scene graph.
    """

    image: np.ndarray
    instances: np.ndarray
    classes: np.ndarray
    depth: np.ndarray
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Object:
    shape: str
    colour: str
    size: str
    texture: str
    cx: float  # centre, fractions of the side
    cy: float
    radius: float
    angle: float
    depth: float
    stripe_phase: float


def generate_scene(
    seed: int,
    index: int = 0,
    size: int = 64,
    *,
    min_objects: int = 1,
    max_objects: int = 6,
    supersample: int | None = None,
) -> Scene:
    """Render scene ``index`` of the run seeded by ``seed`` at ``size`` x ``size`` pixels."""
    # 1. Check inputs
    if not 16 <= size <= 4096:
        raise ValueError(f"scene size must be between 16 and 4096 pixels, got {size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if supersample is None:
        supersample = 4 if size <= 256 else 2
    # 2. Draw the scene graph (the only use of the random stream)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    background = _sample_background(rng)
    objects = [_sample_object(rng, background) for _ in range(int(rng.integers(min_objects, max_objects + 1)))]
    objects.sort(key=lambda o: -o.depth)  # painter's order: far first
    # 3. Rasterise every object, drop the ones left hidden
    objects, layers = _keep_visible(objects, [_rasterise(o, size, supersample) for o in objects], size)
    # 4. Paint far to near, with the ground-truth maps from the same coverage
    image, instances, classes, depth = _paint(background, objects, layers, size)
    # 5. Describe what is visible
    records = _object_records(objects, layers, instances, size)
    caption = _caption(records, background)
    meta = {
        "seed": int(seed),
        "index": int(index),
        "size": int(size),
        "background": {k: v for k, v in background.items() if k != "rgb"},
        "objects": records,
        "caption": caption,
    }
    return Scene(np.clip(image, 0.0, 1.0).astype(np.float32), instances, classes, depth.astype(np.float32), caption, meta)


def _keep_visible(objects: list[_Object], layers: list, size: int) -> tuple[list[_Object], list]:
    """The objects (and their layers) at least MIN_VISIBLE_FRACTION visible and covering a few pixels."""
    visible = _visible_fractions(layers, size)
    min_pixels = max(4.0, 0.002 * size * size)
    kept = [i for i, (frac, px) in enumerate(visible) if frac >= MIN_VISIBLE_FRACTION and px >= min_pixels]
    if not kept:  # the nearest object is never occluded; keep it whatever its size
        kept = [len(objects) - 1]
    return [objects[i] for i in kept], [layers[i] for i in kept]


def _paint(background: dict[str, Any], objects: list[_Object], layers: list,
           size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image, instance ids, class ids and depth: the background, then each layer over it in painter's order."""
    image, depth = _render_background(background, size)
    instances = np.zeros((size, size), np.int32)
    classes = np.zeros((size, size), np.uint8)
    for instance_id, (obj, layer) in enumerate(zip(objects, layers), start=1):
        (y0, y1, x0, x1), coverage, colour = layer
        region = image[y0:y1, x0:x1]
        region[...] = region * (1.0 - coverage[..., None]) + colour * coverage[..., None]
        hard = coverage >= 0.5
        instances[y0:y1, x0:x1][hard] = instance_id
        classes[y0:y1, x0:x1][hard] = SHAPES.index(obj.shape) + 1
        depth[y0:y1, x0:x1][hard] = obj.depth
    return image, instances, classes, depth


def _object_records(objects: list[_Object], layers: list, instances: np.ndarray, size: int) -> list[dict[str, Any]]:
    """Each object's metadata as it ends up in the picture (bbox, visible pixels, coarse position)."""
    records = []
    for instance_id, obj in enumerate(objects, start=1):
        ys, xs = np.nonzero(instances == instance_id)
        full = int((layers[instance_id - 1][1] >= 0.5).sum())
        records.append(
            {
                "instance_id": instance_id,
                "class": obj.shape,
                "class_index": SHAPES.index(obj.shape),
                "colour": obj.colour,
                "rgb": list(COLOURS[obj.colour]),
                "size": obj.size,
                "texture": obj.texture,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "center": [round(obj.cx, 4), round(obj.cy, 4)],
                "radius": round(obj.radius, 4),
                "angle": round(obj.angle, 4),
                "depth": round(float(obj.depth), 6),
                "visible_pixels": int(len(ys)),
                "visible_fraction": round(len(ys) / max(full, 1), 4),
                "position": _position_words(xs.mean() / size, ys.mean() / size),
            }
        )
    return records


# --- sampling ---------------------------------------------------------------------------------------


def _sample_background(rng: np.random.Generator) -> dict[str, Any]:
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    names = list(BACKGROUND_COLOURS)
    first, second = rng.choice(len(names), size=2, replace=False)
    background: dict[str, Any] = {"kind": kind, "colour": names[first], "second_colour": names[second]}
    if kind == "floor":
        background["horizon"] = float(rng.uniform(0.3, 0.5))
    return background


def _sample_object(rng: np.random.Generator, background: dict[str, Any]) -> _Object:
    size_name = list(SIZES)[int(rng.integers(len(SIZES)))]
    radius = SIZES[size_name] * float(rng.uniform(0.9, 1.1))
    cx = float(rng.uniform(radius, 1.0 - radius))
    if background["kind"] == "floor":
        horizon = background["horizon"]
        cy = float(rng.uniform(max(radius, horizon), 1.0 - radius))
        depth = _floor_depth(min(cy + radius, 1.0), horizon) - 1e-3
    else:
        cy = float(rng.uniform(radius, 1.0 - radius))
        depth = float(rng.uniform(0.1, 0.8))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    angle = float(rng.uniform(-0.35, 0.35)) if shape == "heart" else float(rng.uniform(0, 2 * math.pi))
    return _Object(
        shape=shape,
        colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
        size=size_name,
        texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
        cx=cx,
        cy=cy,
        radius=radius,
        angle=angle,
        depth=depth,
        stripe_phase=float(rng.uniform(0, 1)),
    )


def _floor_depth(y: np.ndarray | float, horizon: float) -> np.ndarray | float:
    """Depth of the floor at image row fraction y: 0.2 at the bottom edge, 0.95 at the horizon."""
    t = np.clip((np.asarray(y) - horizon) / (1.0 - horizon), 0.0, 1.0)
    return 0.95 - 0.75 * t


# --- rendering --------------------------------------------------------------------------------------


def _render_background(background: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray]:
    first = np.array(BACKGROUND_COLOURS[background["colour"]], np.float32)
    second = np.array(BACKGROUND_COLOURS[background["second_colour"]], np.float32)
    rows = (np.arange(size, dtype=np.float32) + 0.5) / size
    depth = np.ones((size, size), np.float32)
    if background["kind"] == "flat":
        image = np.broadcast_to(first, (size, size, 3)).copy()
    elif background["kind"] == "gradient":
        t = rows[:, None, None]
        image = np.broadcast_to(first * (1 - t) + second * t, (size, size, 3)).copy()
    else:  # floor: `second` sky above the horizon, `first` floor below, shaded darker far away
        horizon = background["horizon"]
        below = np.clip((rows - horizon) * size, 0.0, 1.0)[:, None, None]  # anti-aliased horizon line
        shade = (0.75 + 0.25 * np.clip((rows - horizon) / (1 - horizon), 0, 1))[:, None, None]
        image = np.broadcast_to(second * (1 - below) + first * shade * below, (size, size, 3)).copy()
        depth = np.broadcast_to(np.where(rows >= horizon, _floor_depth(rows, horizon), 1.0)[:, None], (size, size))
        depth = depth.astype(np.float32).copy()
    return image.astype(np.float32), depth


def _rasterise(obj: _Object, size: int, supersample: int):
    """Coverage (h, w) in [0, 1] and colour (h, w, 3) of one object inside its pixel bounding box."""
    reach = obj.radius * 1.05
    x0 = max(int(math.floor((obj.cx - reach) * size)), 0)
    x1 = min(int(math.ceil((obj.cx + reach) * size)), size)
    y0 = max(int(math.floor((obj.cy - reach) * size)), 0)
    y1 = min(int(math.ceil((obj.cy + reach) * size)), size)
    s = supersample
    xs = (x0 + (np.arange((x1 - x0) * s) + 0.5) / s) / size
    ys = (y0 + (np.arange((y1 - y0) * s) + 0.5) / s) / size
    gx, gy = np.meshgrid(xs, ys)
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    dx, dy = (gx - obj.cx) / obj.radius, (gy - obj.cy) / obj.radius
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # object-local coordinates, radius 1
    inside = _inside(obj.shape, u, v).astype(np.float32)
    colour = _texture(obj, u, v)

    def pool(a: np.ndarray) -> np.ndarray:
        h, w = a.shape[0] // s, a.shape[1] // s
        return a.reshape(h, s, w, s, *a.shape[2:]).mean(axis=(1, 3))

    coverage = pool(inside)
    colour = pool(colour * inside[..., None]) / np.maximum(coverage[..., None], 1e-6)
    return (y0, y1, x0, x1), coverage.astype(np.float32), colour.astype(np.float32)


def _polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points."""
    inside = np.zeros(u.shape, bool)
    n = len(vertices)
    for i in range(n):
        (xa, ya), (xb, yb) = vertices[i], vertices[(i + 1) % n]
        crosses = (ya > v) != (yb > v)
        x_at = xa + (v - ya) * (xb - xa) / np.where(yb == ya, 1e-12, yb - ya)
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n: int, radius: float = 1.0, offset: float = 0.0) -> np.ndarray:
    angles = offset + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ellipse":
        return u * u + (v / 0.6) ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if shape == "diamond":
        return np.abs(u) / 0.75 + np.abs(v) <= 1.0
    if shape == "triangle":
        return _polygon(u, v, _regular(3, 1.0, -math.pi / 2))
    if shape == "hexagon":
        return _polygon(u, v, _regular(6, 0.95))
    if shape == "star":
        outer, inner = _regular(5, 1.0, -math.pi / 2), _regular(5, 0.45, -math.pi / 2 + math.pi / 5)
        return _polygon(u, v, np.stack([outer, inner], axis=1).reshape(10, 2))
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.9)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.9))
    if shape == "heart":
        x, y = u / 0.78, -(v - 0.1) / 0.78  # implicit heart curve, point up
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5 * 0.5)
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def _texture(obj: _Object, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    base = np.array(COLOURS[obj.colour], np.float32)
    # The second tone of a pattern: lighter for dark colours, darker for light ones.
    luminance = float(base @ np.array([0.299, 0.587, 0.114], np.float32))
    other = base * 0.45 if luminance > 0.5 else base * 0.5 + 0.5
    if obj.texture == "solid":
        t = np.zeros(u.shape, np.float32)
    elif obj.texture == "stripes":
        t = (np.sin(2 * math.pi * (u * 2.2 + obj.stripe_phase)) > 0).astype(np.float32)
    elif obj.texture == "checks":
        t = ((np.floor(u * 2.2 + obj.stripe_phase) + np.floor(v * 2.2)) % 2).astype(np.float32)
    else:  # gradient along the object's own axis
        t = np.clip((v + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    return base * (1 - t[..., None]) + other * t[..., None]


def _visible_fractions(layers, size: int) -> list[tuple[float, float]]:
    """(visible fraction, visible pixels) of each layer under painter's order with hard 0.5 masks."""
    owner = np.zeros((size, size), np.int32)
    for i, ((y0, y1, x0, x1), coverage, _) in enumerate(layers, start=1):
        owner[y0:y1, x0:x1][coverage >= 0.5] = i
    out = []
    for i, (_, coverage, _) in enumerate(layers, start=1):
        full = float((coverage >= 0.5).sum())
        seen = float((owner == i).sum())
        out.append((seen / full if full else 0.0, seen))
    return out


# --- language ---------------------------------------------------------------------------------------


def _position_words(x: float, y: float) -> str:
    vertical = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "middle")
    horizontal = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "center")
    if vertical == "middle" and horizontal == "center":
        return "center"
    if vertical == "middle":
        return f"middle {horizontal}"
    return f"{vertical} {horizontal}"


def _object_phrase(record: dict[str, Any]) -> str:
    return f"a {record['size']} {record['colour']} {TEXTURE_WORDS[record['texture']]} {record['class']}"


def _caption(records: list[dict[str, Any]], background: dict[str, Any]) -> str:
    """Objects left to right, each with its coarse position, then the background."""
    ordered = sorted(records, key=lambda r: (r["bbox"][0] + r["bbox"][2]) / 2)
    phrases = [f"{_object_phrase(r)} at the {r['position']}" for r in ordered]
    if len(phrases) == 1:
        objects = phrases[0]
    else:
        objects = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    kind = background["kind"]
    if kind == "flat":
        where = f"on a {background['colour']} background"
    elif kind == "gradient":
        where = f"on a {background['colour']} to {background['second_colour']} gradient"
    else:
        where = f"on a {background['colour']} floor under a {background['second_colour']} sky"
    return f"{objects} {where}"
