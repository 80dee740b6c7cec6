import numpy as np
import pytest

from composer.data.scenes import COLOURS, SHAPES, SIZES, TEXTURE_WORDS, _rasterise, generate_scene


def test_same_seed_same_scene_and_different_seed_differs():
    a, b = generate_scene(3, 5, 64), generate_scene(3, 5, 64)
    for name in ("image", "instances", "classes", "depth"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.caption == b.caption and a.meta == b.meta
    c = generate_scene(3, 6, 64)
    assert not np.array_equal(a.image, c.image)


def test_vocabulary_is_large_enough():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 10 and len(SIZES) >= 3 and len(TEXTURE_WORDS) == 4


@pytest.mark.parametrize("index", range(12))
def test_ground_truth_is_consistent(index):
    scene = generate_scene(11, index, 96)
    objects = scene.meta["objects"]
    assert 1 <= len(objects) <= 6
    ids = set(np.unique(scene.instances)) - {0}
    assert ids == {o["instance_id"] for o in objects}
    for obj in objects:
        region = scene.instances == obj["instance_id"]
        # class map agrees with the instance map and the metadata
        assert np.all(scene.classes[region] == obj["class_index"] + 1)
        x0, y0, x1, y1 = obj["bbox"]
        ys, xs = np.nonzero(region)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert np.allclose(scene.depth[region], obj["depth"], atol=1e-6)
        phrase = f"{obj['size']} {obj['colour']} {TEXTURE_WORDS[obj['texture']]} {obj['class']}"
        assert phrase in scene.caption
    assert np.all(scene.classes[scene.instances == 0] == 0)


def test_instance_regions_are_exactly_the_visible_parts():
    """Recompute visibility from each object's own coverage: nearest object with coverage >= 0.5 wins."""
    from composer.data import scenes as module

    for index in range(8):
        scene = generate_scene(5, index, 64)
        objects = scene.meta["objects"]
        # rebuild the objects from their metadata and rasterise them independently
        owner = np.zeros_like(scene.instances)
        for obj in sorted(objects, key=lambda o: -o["depth"]):
            rebuilt = module._Object(obj["class"], obj["colour"], obj["size"], obj["texture"], obj["center"][0],
                                     obj["center"][1], obj["radius"], obj["angle"], obj["depth"], 0.0)
            (y0, y1, x0, x1), coverage, _ = _rasterise(rebuilt, 64, 4)
            owner[y0:y1, x0:x1][coverage >= 0.5] = obj["instance_id"]
        # rounding of the stored centre/radius can move a boundary pixel; nothing more
        assert (owner != scene.instances).mean() < 0.01


def test_depth_order_agrees_with_occlusion():
    """Where two objects' full shapes overlap, the pixels always show the nearer (smaller depth) one."""
    from composer.data import scenes as module

    overlaps = 0
    for index in range(30):
        scene = generate_scene(2, index, 64)
        objects = {o["instance_id"]: o for o in scene.meta["objects"]}
        full = {}
        for obj in objects.values():
            rebuilt = module._Object(obj["class"], obj["colour"], obj["size"], obj["texture"], obj["center"][0],
                                     obj["center"][1], obj["radius"], obj["angle"], obj["depth"], 0.0)
            (y0, y1, x0, x1), coverage, _ = _rasterise(rebuilt, 64, 4)
            mask = np.zeros((64, 64), bool)
            mask[y0:y1, x0:x1] = coverage >= 0.5
            full[obj["instance_id"]] = mask
        for i in full:
            for j in full:
                if i >= j:
                    continue
                shown = scene.instances[full[i] & full[j]]
                shown = shown[(shown == i) | (shown == j)]  # a third, nearer object may cover some pixels
                if len(shown) > 4:
                    overlaps += 1
                    nearer = i if objects[i]["depth"] < objects[j]["depth"] else j
                    assert np.mean(shown == nearer) > 0.97
                    assert scene.depth[scene.instances == nearer].max() < objects[i + j - nearer]["depth"]
    assert overlaps >= 5  # the check above really ran on occluding pairs


def test_floor_objects_stand_nearer_than_the_floor_behind_them():
    for index in range(40):
        scene = generate_scene(9, index, 64)
        if scene.meta["background"]["kind"] != "floor":
            continue
        for obj in scene.meta["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            region = scene.instances == obj["instance_id"]
            # floor pixels beside the object (same rows, background) are farther than the object
            rows = np.zeros_like(region)
            rows[y0:y1] = True
            floor = rows & (scene.instances == 0)
            if floor.any():
                assert scene.depth[floor].min() >= obj["depth"] - 1e-6


@pytest.mark.parametrize("size", [64, 200, 1024])
def test_any_size_renders_with_anti_aliasing(size):
    scene = generate_scene(0, 1, size)
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.float32
    assert scene.image.min() >= 0 and scene.image.max() <= 1
    # anti-aliasing: edge pixels take intermediate colours, not only the palette's
    unique = np.unique((scene.image * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(unique) > 20


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="size"):
        generate_scene(0, 0, 8)
    with pytest.raises(ValueError, match="min_objects"):
        generate_scene(0, 0, 64, min_objects=3, max_objects=2)
