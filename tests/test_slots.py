"""Slot Attention and the trainable slots decomposer: the published algorithm, equivariance, gradients through
the diffusion loss, persistence, slot editing, and the segment / evaluate-slots commands."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from composer.cli import main
from composer.conditions import Conditions
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines.composer_pipeline import ComposerPipeline
from composer.pipelines.layout import slot_encoder_folder
from composer.slots.editing import (
    add_slots,
    drop_slots,
    edit_slots,
    parse_slot_indices,
    parse_swap,
    swap_slots,
)
from composer.slots.metrics import foreground_ari, mean_best_overlap
from composer.slots.visuals import slot_colours
from decomposers.folder import load_decomposers
from decomposers.set import DecomposerSet
from decomposers.slots import SlotAttention, SlotsDecomposer

TINY_SLOTS = dict(num_slots=4, slot_dim=8, iterations=3, backbone_channels=8, backbone_layers=2, kernel_size=3,
                  input_resolution=16, feature_resolution=8, mlp_hidden_dim=16)
TINY_UNET = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=16)


def reference_slot_attention(weights: dict, inputs: torch.Tensor, slots: torch.Tensor, iterations: int, eps: float = 1e-8):
    """Algorithm 1 of Locatello et al. (2020), written from the paper with plain tensor operations."""
    def layer_norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * weights[f"{prefix}.weight"] + weights[f"{prefix}.bias"]

    dim = slots.shape[-1]
    inputs = layer_norm(inputs, "norm_inputs")
    k = inputs @ weights["project_k.weight"].T
    v = inputs @ weights["project_v.weight"].T
    w_ih, w_hh = weights["gru.weight_ih"], weights["gru.weight_hh"]
    b_ih, b_hh = weights["gru.bias_ih"], weights["gru.bias_hh"]
    attn = None
    for _ in range(iterations):
        slots_prev = slots
        q = layer_norm(slots, "norm_slots") @ weights["project_q.weight"].T
        attn_logits = (q @ k.transpose(1, 2)) / dim**0.5  # (B, N, M)
        attn = torch.exp(attn_logits - attn_logits.max(1, keepdim=True).values)
        attn = attn / attn.sum(1, keepdim=True)  # normalise over the slots
        weighted = (attn + eps) / (attn + eps).sum(2, keepdim=True)
        updates = weighted @ v
        # GRU: r, z, n gates in PyTorch's (r | z | n) weight layout
        gi = updates @ w_ih.T + b_ih
        gh = slots_prev @ w_hh.T + b_hh
        r = torch.sigmoid(gi[..., :dim] + gh[..., :dim])
        z = torch.sigmoid(gi[..., dim : 2 * dim] + gh[..., dim : 2 * dim])
        n = torch.tanh(gi[..., 2 * dim :] + r * gh[..., 2 * dim :])
        slots = (1 - z) * n + z * slots_prev
        hidden = torch.relu(layer_norm(slots, "norm_mlp") @ weights["mlp.0.weight"].T + weights["mlp.0.bias"])
        slots = slots + hidden @ weights["mlp.2.weight"].T + weights["mlp.2.bias"]
    return slots, attn


def test_slot_attention_matches_the_published_algorithm():
    module = SlotAttention(num_slots=5, slot_dim=12, input_dim=10, iterations=4, mlp_hidden_dim=20).double()
    with torch.no_grad():  # move every parameter away from its initial value, biases and norms included
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    inputs = torch.randn(3, 30, 10, dtype=torch.float64)
    initial = torch.randn(3, 5, 12, dtype=torch.float64)
    slots, attention = module(inputs, initial_slots=initial)
    expected_slots, expected_attention = reference_slot_attention(dict(module.state_dict()), inputs, initial, 4)
    torch.testing.assert_close(slots, expected_slots, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(attention, expected_attention, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(attention.sum(1), torch.ones(3, 30, dtype=torch.float64))  # a distribution over slots at every input
    # the learned Gaussian: mu + exp(log sigma) * noise
    noise = torch.randn(5, 12, dtype=torch.float64)
    drawn = module.initial_slots(2, noise=noise)
    torch.testing.assert_close(drawn[1], module.slots_mu[0, 0] + module.slots_log_sigma[0, 0].exp() * noise)


def test_slots_are_permutation_equivariant():
    module = SlotAttention(num_slots=6, slot_dim=8, input_dim=8, iterations=3, mlp_hidden_dim=16)
    inputs = torch.randn(2, 20, 8)
    initial = torch.randn(2, 6, 8)
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    slots, attention = module(inputs, initial_slots=initial)
    permuted_slots, permuted_attention = module(inputs, initial_slots=initial[:, permutation])
    torch.testing.assert_close(permuted_slots, slots[:, permutation], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted_attention, attention[:, permutation], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(slots[:, 0], slots[:, 1], atol=1e-3)  # the slots did not collapse onto one


def tiny_unet(slot_dim: int = 8) -> ComposerUNet:
    from composer.conditions import ConditionSpec

    specs = {"slots": ConditionSpec("slots", ("tokens",), slot_dim, num_tokens=4),
             "palette": ConditionSpec("palette", ("global",), 275)}
    torch.manual_seed(0)
    return ComposerUNet(**model_kwargs("tiny", TINY_UNET, specs))


def test_gradients_reach_the_encoder_through_the_diffusion_loss():
    encoder = SlotsDecomposer(**TINY_SLOTS)
    unet = tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    images = torch.rand(3, 3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    slots = encoder(images, training=True, generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.tensor([10, 400, 900])
    noisy = scheduler.add_noise(images * 2 - 1, noise, timesteps)
    keep = torch.tensor([True, True, False])  # a dropped sample contributes no gradient through its slots
    eps = unet(noisy, timesteps, Conditions({"slots": slots}, {"slots": keep}))
    F.mse_loss(eps, noise).backward()
    first_conv = encoder.backbone.layers[0].weight.grad
    assert first_conv is not None and torch.isfinite(first_conv).all() and first_conv.abs().sum() > 0
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert encoder.slot_attention.slots_mu.grad.abs().sum() > 0
    # only the dropped sample: nothing flows back to the encoder
    encoder.zero_grad()
    slots = encoder(images, training=True, generator=torch.Generator().manual_seed(0))
    eps = unet(noisy, timesteps, Conditions({"slots": slots}, {"slots": torch.tensor([False, False, False])}))
    F.mse_loss(eps, noise).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in encoder.parameters())


def test_inference_is_deterministic_training_draws_from_the_generator():
    encoder = SlotsDecomposer(**TINY_SLOTS)
    images = torch.rand(3, 3, 24, 24)
    a, b = encoder(images), encoder(images)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    for i in range(3):  # a batch equals its singles
        torch.testing.assert_close(encoder(images[i : i + 1]), a[i : i + 1], atol=1e-5, rtol=1e-5)
    t1 = encoder(images, training=True, generator=torch.Generator().manual_seed(1))
    t2 = encoder(images, training=True, generator=torch.Generator().manual_seed(1))
    t3 = encoder(images, training=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(t1, t2, atol=0, rtol=0)
    assert not torch.allclose(t1, t3) and not torch.allclose(t1, a)
    slots, masks = encoder.encode(images, num_slots=6)  # another slot count than trained
    assert slots.shape == (3, 6, 8) and masks.shape == (3, 6, 24, 24)
    torch.testing.assert_close(masks.sum(1), torch.ones(3, 24, 24), atol=1e-5, rtol=0)
    assert masks.min() >= 0 and masks.max() <= 1
    assert encoder.spec.num_tokens == 4 and encoder.spec.dim == 8 and encoder.trainable


def test_bad_resolutions_are_clear_errors():
    with pytest.raises(ValueError, match="feature_resolution"):
        SlotsDecomposer(input_resolution=64, feature_resolution=24)
    with pytest.raises(ValueError, match="feature_resolution"):
        SlotsDecomposer(input_resolution=64, feature_resolution=4, backbone_layers=2)
    with pytest.raises(ValueError, match="images must be"):
        SlotsDecomposer(**TINY_SLOTS)(torch.rand(2, 1, 16, 16))


def test_save_load_round_trip_gives_identical_slots(tmp_path):
    encoder = SlotsDecomposer(**TINY_SLOTS, init_seed=3)
    with torch.no_grad():
        encoder.slot_attention.slots_mu.add_(1.0)  # not the initial weights
    images = torch.rand(2, 3, 16, 16)
    encoder.save_pretrained(tmp_path / "slots")
    assert json.loads((tmp_path / "slots" / "config.json").read_text())["init_seed"] == 3
    loaded = SlotsDecomposer.from_pretrained(tmp_path / "slots")
    torch.testing.assert_close(loaded(images), encoder(images), atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="no slot encoder weights"):
        SlotsDecomposer.from_pretrained(tmp_path / "nothing")


@pytest.fixture(scope="module")
def slots_pipeline(tmp_path_factory):
    """A tiny pipeline folder trained with slots and palette, written the way training writes it."""
    options = {"slots": dict(TINY_SLOTS)}
    decomposers = DecomposerSet(["slots", "palette"], options)
    with torch.no_grad():
        for parameter in decomposers.decomposers["slots"].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.manual_seed(0)
    unet = ComposerUNet(**model_kwargs("tiny", TINY_UNET, decomposers.specs())).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    pipe = ComposerPipeline(unet, scheduler, decomposers)
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    pipe.save_pretrained(folder)
    return pipe, folder


def test_the_encoder_loads_from_a_pipeline_folder(slots_pipeline):
    pipe, folder = slots_pipeline
    images = torch.rand(2, 3, 16, 16)
    expected = pipe.decomposers.decomposers["slots"](images)
    torch.testing.assert_close(SlotsDecomposer.from_pretrained(slot_encoder_folder(folder))(images), expected, atol=0, rtol=0)
    reloaded = load_decomposers(folder / "decomposers")
    torch.testing.assert_close(reloaded.decompose(images)["slots"], expected, atol=0, rtol=0)


def test_dropping_slots_equals_removing_their_tokens():
    unet = tiny_unet().eval()
    slots = torch.randn(2, 4, 8)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    with torch.no_grad():
        dropped = unet(x, t, Conditions({"slots": drop_slots(slots, [1, 3])}))
        removed = unet(x, t, Conditions({"slots": slots[:, [0, 2]]}))
        full = unet(x, t, Conditions({"slots": slots}))
        torch.testing.assert_close(dropped, removed, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(dropped, full, atol=1e-4)
        # an added slot acts like a slot that was there from the start
        grown = unet(x, t, Conditions({"slots": add_slots(slots[:, [0, 2]], slots, [1])}))
        torch.testing.assert_close(grown, unet(x, t, Conditions({"slots": slots[:, [0, 2, 1]]})), atol=1e-5, rtol=1e-5)


def test_swapping_slots_transplants_them():
    a, b = torch.randn(2, 4, 8), torch.randn(1, 5, 8)
    swapped = swap_slots(a, b, [(3, 0), (1, 4)])
    torch.testing.assert_close(swapped[:, 3], b[:, 0].expand(2, -1))
    torch.testing.assert_close(swapped[:, 1], b[:, 4].expand(2, -1))
    torch.testing.assert_close(swapped[:, [0, 2]], a[:, [0, 2]])
    edited = edit_slots(a, drop=[0], source=b, swaps=[(2, 2)])
    assert edited["mask"].tolist() == [[False, True, True, True]] * 2
    torch.testing.assert_close(edited["tokens"][:, 2], b[:, 2].expand(2, -1))
    with pytest.raises(ValueError, match="out of range"):
        drop_slots(a, [4])
    with pytest.raises(ValueError, match="out of range"):
        swap_slots(a, b, [(0, 5)])
    assert parse_slot_indices("2,5") == [2, 5]
    assert parse_swap("C:/imgs/b.png:3") == ("C:/imgs/b.png", [(3, 3)])
    assert parse_swap("b.png:3=5,1") == ("b.png", [(3, 5), (1, 1)])
    with pytest.raises(ValueError, match="--swap-slots"):
        parse_swap("b.png")


def test_segment_command_writes_the_argmax_segmentation(slots_pipeline, tmp_path, capsys):
    _, folder = slots_pipeline
    from skimage import data

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    assert main(["segment", str(tmp_path / "cat.png"), "--model", str(folder), "--out", str(tmp_path / "seg")]) == 0
    out = tmp_path / "seg"
    assert "area per slot" in capsys.readouterr().out
    encoder = SlotsDecomposer.from_pretrained(slot_encoder_folder(folder))
    from composer.imageio import load_image

    image = load_image(tmp_path / "cat.png", 16)
    with torch.no_grad():
        _, masks = encoder.encode(image)
    expected = (slot_colours(4)[masks.argmax(1)[0]].numpy() * 255).round()
    written = np.asarray(Image.open(out / "segmentation.png")).astype(np.float64)
    assert written.shape == (16, 16, 3) and np.abs(written - expected).max() <= 1
    for index in range(4):
        soft = np.asarray(Image.open(out / f"slot-{index:02d}.png"))[..., 0] / 255.0
        assert np.abs(soft - masks[0, index].numpy()).max() <= 1 / 255 + 1e-6
    assert (out / "overlay.png").is_file() and (out / "sheet.png").is_file()
    assert main(["segment", str(tmp_path / "cat.png"), "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "no slot encoder weights" in capsys.readouterr().err


def test_evaluate_slots_command_reports_the_metrics_of_the_masks(slots_pipeline, tmp_path, capsys):
    from composer.data.shards import write_scene_shards

    _, folder = slots_pipeline
    write_scene_shards(tmp_path / "scenes", 5, 64, seed=3, shard_size=5, progress=False)
    code = main(["evaluate-slots", "--model", str(folder), "--shards", str(tmp_path / "scenes" / "scenes-*.tar"),
                 "--batch-size", "2", "--json", str(tmp_path / "metrics.json")])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["images"] == 5 and f"FG-ARI: {100 * result['fg_ari']:.1f}" in printed
    # the same numbers from the ground-truth maps directly
    from composer.data.config import DataConfig
    from composer.data.loader import make_loader

    data = DataConfig(shards=[str(tmp_path / "scenes" / "scenes-000000.tar")], resolution=16, batch_size=5,
                      shuffle_shards=False, shuffle_buffer=0, extras=["instances"])
    batch = next(iter(make_loader(data, seed=0, epochs=1)))
    with torch.no_grad():
        _, masks = SlotsDecomposer.from_pretrained(slot_encoder_folder(folder)).encode(batch["image"])
    assert result["fg_ari"] == pytest.approx(float(foreground_ari(batch["instances"], masks).nanmean()), abs=1e-9)
    assert result["mbo"] == pytest.approx(float(mean_best_overlap(batch["instances"], masks).nanmean()), abs=1e-9)


def test_generate_style_slot_arguments(slots_pipeline, tmp_path):
    pipe, _ = slots_pipeline
    from skimage import data

    from composer.imageio import load_image
    from composer.slots.editing import slots_from_arguments

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    encoder = pipe.decomposers.decomposers["slots"]
    with torch.no_grad():
        cat = encoder(load_image(tmp_path / "cat.png", 64))
        astronaut = encoder(load_image(tmp_path / "astronaut.png", 64))
    np.save(tmp_path / "astronaut.npy", astronaut[0].numpy())
    plain = slots_from_arguments(pipe, str(tmp_path / "cat.png"))
    torch.testing.assert_close(plain, cat, atol=1e-6, rtol=0)
    edited = slots_from_arguments(pipe, str(tmp_path / "cat.png"), drop="0", swap=f"{tmp_path / 'astronaut.npy'}:2=1")
    assert edited["mask"].tolist() == [[False, True, True, True]]
    torch.testing.assert_close(edited["tokens"][0, 2], astronaut[0, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(edited["tokens"][0, [0, 1, 3]], cat[0, [0, 1, 3]], atol=1e-6, rtol=0)
    out = pipe(Conditions({"slots": edited}), num_inference_steps=2, output_type="pt", progress=False, precision="fp32",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 16, 16)


def test_generate_cli_drops_and_swaps_slots(slots_pipeline, tmp_path, capsys):
    """--drop-slots removes slots (a different image than keeping them), --swap-slots transplants one."""
    from skimage import data

    _, folder = slots_pipeline
    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    common = ["generate", "--model", str(folder), "--slots", str(tmp_path / "cat.png"), "--steps", "2",
              "--seed", "3"]
    outputs = {}
    for name, extra in {"plain": [], "drop": ["--drop-slots", "0,2"],
                        "swap": ["--swap-slots", f"{tmp_path / 'astronaut.png'}:1=3"]}.items():
        assert main(common + extra + ["--out", str(tmp_path / f"{name}.png")]) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert np.abs(outputs["plain"] - outputs["drop"]).max() > 0
    assert np.abs(outputs["plain"] - outputs["swap"]).max() > 0
    assert main(common + ["--drop-slots", "9", "--out", str(tmp_path / "bad.png")]) == 2
    assert "slot" in capsys.readouterr().err.lower()
