import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from composer.cli import main
from composer.config import load_config
from composer.data.loader import make_loader
from composer.data.scenes import generate_scene
from composer.data.shards import write_image_folder_shards, write_scene_shards


def test_scene_shard_round_trip(tmp_path):
    shards = write_scene_shards(tmp_path, 6, 64, seed=4, shard_size=4, progress=False)
    assert [p.name for p in shards] == ["scenes-000000.tar", "scenes-000001.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert {"000000000.png", "000000000.txt", "000000000.json", "000000000.instances.png",
            "000000000.classes.png", "000000000.depth.png"} <= set(names)
    cfg = load_config([], ["data.shuffle_shards=false", "data.shuffle_buffer=0", "data.batch_size=6",
                           "data.extras=[instances,classes,depth]"])
    cfg.data.shards = [str(tmp_path / "scenes-{000000..000001}.tar")]
    batch = next(iter(make_loader(cfg.data, seed=0, epochs=1)))
    for i, key in enumerate(batch["key"]):
        scene = generate_scene(4, int(key), 64)
        np.testing.assert_allclose(batch["image"][i].permute(1, 2, 0).numpy(), scene.image, atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(batch["instances"][i, 0].numpy(), scene.instances)
        np.testing.assert_array_equal(batch["classes"][i, 0].numpy(), scene.classes)
        np.testing.assert_allclose(batch["depth"][i, 0].numpy(), scene.depth, atol=1 / 65535)
        assert batch["caption"][i] == scene.caption
        assert batch["meta"][i]["objects"] == json.loads(json.dumps(scene.meta))["objects"]


def test_scenes_cli_and_refusing_to_overwrite(tmp_path, capsys):
    assert main(["scenes", "--num", "3", "--size", "64", "--out", str(tmp_path), "--shard-size", "2"]) == 0
    assert len(list(tmp_path.glob("scenes-*.tar"))) == 2
    assert main(["scenes", "--num", "3", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["scenes", "--num", "3", "--size", "32", "--out", str(tmp_path / "x")]) == 2


def test_image_folder_to_img2dataset_layout(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a.jpg")
    Image.new("L", (20, 20), 128).save(folder / "sub" / "b.png")
    (folder / "a.txt").write_text("a red photo\n")
    (folder / "broken.jpg").write_bytes(b"not an image")
    shards, skipped = write_image_folder_shards(folder, tmp_path / "out", shard_size=10, progress=False)
    assert skipped == 1 and len(shards) == 1
    with tarfile.open(shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members["000000000.jpg"] == (folder / "a.jpg").read_bytes()
    assert members["000000000.txt"] == b"a red photo"
    meta = json.loads(members["000000000.json"])
    assert (meta["width"], meta["height"], meta["original_filename"]) == (40, 30, "a.jpg")
    assert "000000002.png" in members and "000000002.txt" not in members
    cfg = load_config([], ["data.batch_size=2", "data.resolution=16"])
    cfg.data.shards = [str(shards[0])]
    loader = make_loader(cfg.data, seed=0, epochs=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert sorted(batch["caption"]) == ["", "a red photo"]


def test_shards_cli_errors(tmp_path, capsys):
    assert main(["shards", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["shards", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


@pytest.fixture()
def png_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folder_of_only_unreadable_files_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could be read"):
        write_image_folder_shards(tmp_path, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))
