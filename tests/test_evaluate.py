"""composer.evaluate: each metric on constructed cases with known answers, and `evaluate` end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from composer.data.scenes import COLOURS, SHAPES
from composer.evaluate import metrics

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "assets" / "scene-clip" / "scene-clip-tiny.safetensors"


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only waits for the other (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def astronaut(size: int = 128) -> torch.Tensor:
    from skimage import data

    picture = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)[None].float() / 255


# --- pixels ------------------------------------------------------------------------------------------------


def test_psnr_of_identical_images_is_the_cap_and_of_a_known_error_is_known():
    image = astronaut(32)
    assert metrics.psnr(image, image).item() == metrics.PSNR_CAP
    shifted = (image * 0.8 + 0.1).clamp(0, 1)
    offset = torch.full_like(image, 0.5)
    assert metrics.psnr(offset, offset + 0.1).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01
    assert metrics.psnr(offset, offset + 0.01).item() == pytest.approx(40.0, abs=1e-3)  # MSE 1e-4: the cap
    assert metrics.psnr(image, shifted).item() < metrics.PSNR_CAP
    region = torch.zeros(1, 1, 32, 32)
    region[..., :16, :] = 1
    half = offset.clone()
    half[..., 16:, :] += 0.3  # differs only outside the region
    assert metrics.psnr(offset, half, region).item() == metrics.PSNR_CAP
    assert metrics.psnr(offset, half, 1 - region).item() == pytest.approx(-10 * math.log10(0.09), abs=1e-4)


def test_intensity_psnr_compares_the_samples_gray_with_the_condition():
    image = astronaut(32)
    gray = metrics.grayscale(image)
    assert metrics.intensity_psnr(image, gray).item() == metrics.PSNR_CAP
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert metrics.intensity_psnr(flat, torch.full((1, 1, 8, 8), 0.5)).item() == pytest.approx(20.0, abs=1e-3)


def test_masking_scores_exact_kept_region_known_hole_and_changed_pixels():
    source = torch.full((2, 3, 16, 16), 0.5)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    sample = torch.where(mask > 0, source + 0.1, source)
    scores = metrics.masking_scores(sample, source, mask)
    assert scores["kept_psnr"].tolist() == [metrics.PSNR_CAP] * 2
    assert scores["hole_psnr"].tolist() == pytest.approx([20.0, 20.0], abs=1e-3)
    assert scores["changed_outside"].tolist() == [0, 0]
    sample[1, :, 0, 0] = 0.0  # one pixel outside the mask changed
    sample[1, 0, 15, 15] = 1.0  # and one more, in one channel only
    assert metrics.masking_scores(sample, source, mask)["changed_outside"].tolist() == [0, 2]


# --- palette and sketch ------------------------------------------------------------------------------------


def test_histogram_intersection_identical_disjoint_and_half_overlap():
    from decomposers.palette import PaletteDecomposer

    palette = PaletteDecomposer()
    image = astronaut(64)
    hist = palette(image)
    assert metrics.histogram_intersection(hist, hist).item() == pytest.approx(1.0, abs=1e-5)
    a, b = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 0, 0.5, 0.5]])
    assert metrics.histogram_intersection(a, b).item() == 0.0
    c = torch.tensor([[0.5, 0.5, 0, 0]])
    assert metrics.histogram_intersection(a, c).item() == 0.5
    red, blue = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    red[:, 0], blue[:, 2] = 0.9, 0.9
    assert metrics.histogram_intersection(palette(red), palette(blue)).item() < 0.5


def _shift(edges: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(edges)
    h, w = edges.shape[-2:]
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = edges[..., max(-dy, 0) : h - max(dy, 0),
                                                                                max(-dx, 0) : w - max(dx, 0)]
    return out


def test_edge_f1_tolerates_two_pixels_and_not_five():
    from decomposers.sketch import SketchDecomposer

    edges = SketchDecomposer()(astronaut(128))
    edges[..., :8, :] = edges[..., -8:, :] = edges[..., :, :8] = edges[..., :, -8:] = 0  # no edge leaves the frame
    assert edges.sum() > 200
    assert metrics.edge_f1(edges, edges).item() == 1.0
    assert metrics.edge_f1(_shift(edges, 1, 0), edges).item() == 1.0
    assert metrics.edge_f1(_shift(edges, 1, 1), edges).item() == 1.0  # diagonal: sqrt(2) px
    assert metrics.edge_f1(_shift(edges, 0, 2), edges).item() == 1.0
    assert metrics.edge_f1(_shift(edges, 5, 0), edges).item() < 0.8
    line = torch.zeros(1, 1, 32, 32)
    line[..., 4:28, 10] = 1
    assert metrics.edge_f1(_shift(line, 0, 5), line).item() == 0.0
    assert metrics.edge_f1(_shift(line, 0, 3), line).item() == 0.0  # 3 px is beyond the tolerance
    empty = torch.zeros_like(line)
    assert metrics.edge_f1(empty, empty).item() == 1.0
    assert metrics.edge_f1(empty, line).item() == 0.0 and metrics.edge_f1(line, empty).item() == 0.0
    half = line.clone()
    half[..., 16:28, 10] = 0  # precision 1; recall 14/24 (rows 4-17: two within the tolerance) -> F1 28/38
    assert metrics.edge_f1(half, line).item() == pytest.approx(28 / 38, abs=1e-6)


# --- depth and instances -----------------------------------------------------------------------------------


def test_spearman_of_a_monotone_transform_is_one_and_ties_match_scipy():
    from scipy.stats import spearmanr

    generator = torch.Generator().manual_seed(0)
    depth = torch.rand(3, 1, 16, 16, generator=generator)
    assert metrics.spearman(torch.exp(3 * depth) - 7, depth).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert metrics.spearman(-depth, depth).tolist() == pytest.approx([-1.0] * 3, abs=1e-6)
    quantised = (depth * 4).floor()  # many ties
    other = torch.rand(3, 1, 16, 16, generator=generator)
    expected = [spearmanr(quantised[i].flatten(), other[i].flatten()).statistic for i in range(3)]
    assert metrics.spearman(quantised, other).tolist() == pytest.approx(expected, abs=1e-6)
    assert metrics.spearman(torch.ones(1, 1, 4, 4), depth[:1, :, :4, :4]).item() == 0.0


def test_hungarian_iou_ignores_id_order_and_counts_misses_and_extras():
    target = torch.zeros(1, 1, 20, 20, dtype=torch.long)
    target[..., 0:10, 0:10] = 1
    target[..., 10:20, 10:20] = 2
    target[..., 0:5, 12:20] = 3
    permuted = torch.zeros_like(target)
    for old, new in ((1, 7), (2, 3), (3, 1)):
        permuted[target == old] = new
    assert metrics.matched_iou(permuted, target).item() == pytest.approx(1.0)
    one = (target == 1).long()  # only the first instance found
    assert metrics.matched_iou(one, target).item() == pytest.approx(1 / 3)
    split = torch.zeros_like(target)
    split[..., 0:10, 0:5], split[..., 0:10, 5:10] = 1, 2  # one object predicted as two halves
    assert metrics.matched_iou(split, one).item() == pytest.approx(0.5 / 2)
    empty = torch.zeros_like(target)
    assert metrics.matched_iou(empty, empty).item() == 1.0 and metrics.matched_iou(empty, target).item() == 0.0


# --- scene-CLIP measures, colours, shapes, distances ---------------------------------------------------------


def test_retrieval_top1_finds_its_own_key_and_chance_otherwise():
    keys = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert metrics.retrieval_top1(keys, keys, torch.arange(5)).tolist() == [1.0] * 5
    assert metrics.retrieval_top1(keys, keys, torch.roll(torch.arange(5), 1)).tolist() == [0.0] * 5


def test_colour_share_counts_the_named_colours_present():
    red = torch.tensor(COLOURS["red"]).view(1, 3, 1, 1).expand(1, 3, 16, 16).clone()
    one_red = {"size": 16, "objects": [{"colour": "red", "class": "star", "visible_pixels": 40}]}
    one_blue = {"size": 16, "objects": [{"colour": "blue", "class": "star", "visible_pixels": 40}]}
    both = {"size": 16, "objects": one_red["objects"] + one_blue["objects"]}
    scores = metrics.colour_share(red.expand(4, -1, -1, -1), [one_red, one_blue, both, {}])
    assert scores[:3].tolist() == [1.0, 0.0, 0.5] and math.isnan(scores[3])
    few = torch.tensor(COLOURS["grey"]).view(1, 3, 1, 1).expand(1, 3, 16, 16).clone()
    few[..., :2, :4] = red[..., :2, :4]  # 8 red pixels: less than 25 % of a 40-pixel red object
    assert metrics.colour_share(few, [one_red]).item() == 0.0


def test_shape_share_reads_the_instance_models_class_map():
    classes = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    classes[..., :8, :8] = SHAPES.index("star") + 1
    meta = {"size": 16, "objects": [{"colour": "red", "class": "star", "visible_pixels": 60},
                                    {"colour": "red", "class": "circle", "visible_pixels": 60}]}
    assert metrics.shape_share(classes, [meta], SHAPES).item() == 0.5
    classes[..., 8:, 8:] = SHAPES.index("circle") + 1
    assert metrics.shape_share(classes, [meta], SHAPES).item() == 1.0


def test_fid_of_a_shifted_set_is_the_squared_shift_and_kid_grows_with_the_shift():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(a, a + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    b = torch.randn(200, 4, generator=generator, dtype=torch.float64)
    assert abs(metrics.kid(a, b)) < 0.05 * metrics.kid(a, b + shift)
    with pytest.raises(ValueError, match="fid needs"):
        metrics.fid(a[:1], b)


# --- the command, end to end on a tiny random model ------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffusers import DDPMScheduler

    from composer.data.shards import write_scene_shards
    from composer.models.config import model_kwargs
    from composer.models.unet import ComposerUNet
    from composer.pipelines.composer_pipeline import ComposerPipeline
    from decomposers.set import DecomposerSet

    root = tmp_path_factory.mktemp("evaluate")
    clip = {"model_name": "scene-clip-tiny", "pretrained": str(CLIP), "model_config_file": str(CLIP.with_suffix(".json"))}
    names = ["caption", "image_embedding", "palette", "sketch", "depth", "intensity", "masking"]
    decomposers = DecomposerSet(names, {"caption": clip, "image_embedding": clip})
    torch.manual_seed(0)
    tiny = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=32)
    unet = ComposerUNet(**model_kwargs("tiny", tiny, decomposers.specs()))
    ComposerPipeline(unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), decomposers).save_pretrained(root / "model")
    write_scene_shards(root / "heldout", 3, 64, seed=5, shard_size=3, progress=False)
    return root


def test_evaluate_end_to_end_on_a_tiny_model(files, capsys):
    from composer.cli import main

    out = files / "out"
    code = main(["evaluate", "--model", str(files / "model"), "--shards", str(files / "heldout" / "scenes-*.tar"),
                 "--num", "2", "--steps", "1", "--pairs", "sketch+palette,depth+caption", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    assert result["num"] == 2 and result["steps"] == 1
    runs = result["runs"]
    # depth has no estimator: given in `all` and pairs, not generated alone, and said so
    assert {"none", "caption", "image_embedding", "palette", "sketch", "intensity", "masking", "all",
            "sketch + palette", "depth + caption"} == set(runs)
    assert any("no depth model" in note for note in result["notes"])
    assert runs["masking"]["changed_outside"]["total"] == 0  # an edit keeps every pixel outside the mask
    ceiling = result["ceiling"]
    assert ceiling["palette"]["palette_intersection"] == pytest.approx(1.0, abs=1e-5)
    assert ceiling["sketch"]["edge_f1"] == 1.0
    assert ceiling["intensity"]["gray_psnr"] == metrics.PSNR_CAP
    assert ceiling["masking"]["kept_psnr"] == metrics.PSNR_CAP == ceiling["masking"]["hole_psnr"]
    assert ceiling["image_embedding"]["image_top1"] == 1.0
    assert runs["masking"]["scores"]["masking"]["kept_psnr"] == metrics.PSNR_CAP
    rows = {(r["condition"], r["measure"]): r for r in result["summary"]}
    palette = rows[("palette", "palette_intersection")]
    expected = (palette["single"] - palette["floor"]) / (palette["ceiling"] - palette["floor"])
    assert palette["gap_closed"] == pytest.approx(expected)
    pair = next(p for p in result["pairs"] if p["pair"] == "sketch + palette")
    assert pair["first"]["single"] == runs["sketch"]["scores"]["sketch"]["edge_f1"]
    assert pair["second"]["pair"] == runs["sketch + palette"]["scores"]["palette"]["palette_intersection"]
    assert all(math.isfinite(run["fid"]) for run in runs.values())
    table = (out / "results.md").read_text()
    assert "| palette | palette_intersection |" in table and "scene-CLIP FID" in table
    sheet = Image.open(out / "contact.png")
    assert sheet.height == (len(runs) + 1) * 98 + 2  # the sources, then one row per run


@pytest.mark.parametrize("argv, words", [
    (["--num", "1"], "at least 2"),
    (["--pairs", "sketch+sketch"], "two different conditions"),
    (["--pairs", "sketch+slots"], "slots"),
    (["--pairs", "masking+palette"], "region edit"),
])
def test_bad_input_is_one_clear_line(files, capsys, argv, words):
    from composer.cli import main

    code = main(["evaluate", "--model", str(files / "model"), "--shards", str(files / "heldout" / "scenes-*.tar"),
                 "--out", str(files / "bad"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_a_folder_that_is_not_a_pipeline_is_refused(files, capsys):
    from composer.cli import main

    code = main(["evaluate", "--model", str(files), "--shards", str(files / "heldout" / "scenes-*.tar"),
                 "--out", str(files / "bad")])
    assert code == 2 and "not a pipeline folder" in capsys.readouterr().err


def test_depth_and_instance_estimators_given_by_the_caller_are_used(files):
    from composer.evaluate.run import EvalSettings, evaluate, load_held_out
    from composer.evaluate.scoring import Scorer
    from composer.pipelines.composer_pipeline import ComposerPipeline
    from composer.train.step import batch_extras

    def depth_model(images):  # a stand-in estimator: darker = farther
        return 1 - metrics.grayscale(images)

    def instance_model(images):  # one "circle" wherever the image is bright
        ids = (metrics.grayscale(images) > 0.6).long()
        return ids, ids * (SHAPES.index("circle") + 1)

    pipe = ComposerPipeline.from_pretrained(files / "model")
    scorer = Scorer(CLIP, depth_model=depth_model, instance_model=instance_model)
    shards = str(files / "heldout" / "scenes-*.tar")
    result, samples = evaluate(pipe, shards, EvalSettings(num=2, steps=1, pairs=[]), scorer)
    assert "depth" in result["runs"] and "depth_spearman" in result["runs"]["depth"]["scores"]["depth"]
    batch = load_held_out(shards, 2, 32)
    condition = pipe.decomposers.decompose(batch["image"], extras=batch_extras(batch, "cpu"), names=["depth"])["depth"]
    expected = metrics.spearman(depth_model(batch["image"]), condition).mean().item()
    assert result["ceiling"]["depth"]["depth_spearman"] == pytest.approx(expected, abs=1e-6)
    # the model has no instances condition, but the shape share of caption / image embedding reads the class map
    classes = instance_model(batch["image"])[1]
    shapes = metrics.shape_share(classes, batch["meta"], SHAPES)
    assert result["ceiling"]["caption"]["shape_share"] == pytest.approx(shapes[torch.isfinite(shapes)].mean().item())
    assert not any("no depth model" in note for note in result["notes"])


def test_a_pair_takes_its_second_condition_from_the_next_scene_and_masking_is_an_edit():
    from composer.conditions import Conditions
    from composer.evaluate.run import parse_pairs, plan_runs, run_conditions

    names = ["palette", "sketch", "masking"]
    runs = {r.label: r for r in plan_runs(names, parse_pairs("sketch+palette", names))}
    assert list(runs) == ["none", "palette", "sketch", "masking", "all", "sketch + palette"]
    assert runs["masking"].edit and not runs["all"].edit and runs["none"].sources == {}
    rows = torch.arange(4, dtype=torch.float32)[:, None]
    conditions = Conditions({"sketch": rows.clone(), "palette": 10 + rows})
    part = run_conditions(runs["sketch + palette"], conditions, torch.tensor([2, 3]), 4)
    assert part["sketch"][:, 0].tolist() == [2, 3] and part["palette"][:, 0].tolist() == [13, 10]  # scene k + 1 mod N
    assert part.batch_size == 2 and run_conditions(runs["none"], conditions, torch.tensor([0]), 4).values == {}
    assert parse_pairs(None, names) is None and parse_pairs("none", names) == []


def test_the_shape_share_needs_an_instance_model_whose_classes_are_the_scene_shapes():
    from composer.evaluate.scoring import Scorer, Targets

    targets = Targets(sources=torch.zeros(1, 3, 8, 8), captions=["a star"], mask=torch.zeros(1, 1, 8, 8),
                      metas=[{"size": 8, "objects": [{"class": "star", "colour": "red", "visible_pixels": 4}]}])
    def model(images):
        return torch.zeros(1, 1, 8, 8, dtype=torch.long), torch.zeros(1, 1, 8, 8, dtype=torch.long)

    assert "no instance model" in Scorer(CLIP).unavailable("shape_share", targets)
    assert Scorer(CLIP, instance_model=model, instance_names=SHAPES).unavailable("shape_share", targets) is None
    coco = Scorer(CLIP, instance_model=model, instance_names=["person", "bicycle"])
    assert "not the scene shapes" in coco.unavailable("shape_share", targets)


def test_summaries_close_the_gap_and_pairs_keep_their_single_gain():
    from composer.evaluate.run import summarise

    def scores(**values):
        return {"scores": {n: {m: v} for n, (m, v) in values.items()}}

    runs = {"palette": scores(palette=("palette_intersection", 0.6)), "sketch": scores(sketch=("edge_f1", 0.5)),
            "all": scores(palette=("palette_intersection", 0.8), sketch=("edge_f1", 0.3)),
            "palette + sketch": scores(palette=("palette_intersection", 0.56), sketch=("edge_f1", 0.3))}
    floor = {"palette": {"palette_intersection": 0.2}, "sketch": {"edge_f1": 0.1}}
    shifted = {"palette": {"palette_intersection": 0.25}, "sketch": {"edge_f1": 0.1}}
    ceiling = {"palette": {"palette_intersection": 1.0}, "sketch": {"edge_f1": 1.0}}
    summary, pairs = summarise(["palette", "sketch"], [("palette", "sketch")], runs, floor, shifted, ceiling)
    palette = summary[0]
    assert palette["gap_closed"] == pytest.approx(0.5) and palette["gap_closed_all"] == pytest.approx(0.75)
    pair = pairs[0]
    assert pair["first"]["kept_gain"] == pytest.approx(0.9) and pair["first"]["ratio"] == pytest.approx(0.56 / 0.6)
    assert pair["second"]["kept_gain"] == pytest.approx(0.5)  # (0.3 - 0.1) / (0.5 - 0.1)
    assert pair["both_keep_90"] is False
    runs["sketch"] = scores(sketch=("edge_f1", 0.05))  # the single run does no better than none: nothing to keep
    assert summarise(["palette", "sketch"], [("palette", "sketch")], runs, floor, shifted, ceiling)[1][0]["both_keep_90"] is None


def test_runs_makes_only_the_named_runs_beside_the_floor(files, capsys):
    from composer.cli import main

    out = files / "some"
    code = main(["evaluate", "--model", str(files / "model"), "--shards", str(files / "heldout" / "scenes-*.tar"),
                 "--num", "2", "--steps", "1", "--pairs", "none", "--runs", "masking,palette", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    assert set(result["runs"]) == {"none", "masking", "palette"}
    assert {r["condition"] for r in result["summary"]} == {"masking", "palette"}
    assert all(r["all"] is None for r in result["summary"])
    assert "| masking | hole_psnr |" in (out / "results.md").read_text()
    code = main(["evaluate", "--model", str(files / "model"), "--shards", str(files / "heldout" / "scenes-*.tar"),
                 "--num", "2", "--runs", "masking,slotz", "--out", str(files / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "slotz" in err and "choose from" in err, err
