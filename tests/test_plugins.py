"""Third-party decomposers of every kind, installed through the entry-point group, train a step and sample.

The plugin is a real distribution on sys.path (a dist-info folder with entry_points.txt), found by
importlib.metadata exactly as `pip install my-plugin` would make it found; the model routes its conditions by
their ConditionSpec alone (none of these names is known to the model code).
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from composer.config import load_config
from composer.data.shards import write_scene_shards
from composer.pipelines import ComposerPipeline
from composer.train.loop import train

PLUGIN = '''
import torch
from composer.conditions import ConditionSpec
from decomposers.base import Decomposer


class MeanColour(Decomposer):
    """global: the image's mean colour and its spread (6 numbers)."""
    name, kinds = "plugin_global", ("global",)

    @property
    def spec(self):
        return ConditionSpec(self.name, self.kinds, 6, num_tokens=2)

    def forward(self, images, **context):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)

    def visualize(self, rep):
        return rep[:, :3, None, None].expand(-1, 3, 8, 8).clamp(0, 1)


class Quadrants(Decomposer):
    """tokens: the mean colour of each image quadrant (4 tokens of width 3)."""
    name, kinds = "plugin_tokens", ("tokens",)

    @property
    def spec(self):
        return ConditionSpec(self.name, self.kinds, 3, num_tokens=4)

    def forward(self, images, **context):
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 2)  # (B, 3, 2, 2)
        return pooled.flatten(2).transpose(1, 2)  # (B, 4, 3)

    def visualize(self, rep):
        return rep.transpose(1, 2).reshape(-1, 3, 2, 2)


class Redness(Decomposer):
    """local: how much redder than its other channels each pixel is (1 channel)."""
    name, kinds = "plugin_local", ("local",)

    @property
    def spec(self):
        return ConditionSpec(self.name, self.kinds, 1, resize="smooth")

    def forward(self, images, **context):
        return (images[:, :1] - images[:, 1:].mean(1, keepdim=True)).clamp(0, 1)

    def visualize(self, rep):
        return rep.expand(-1, 3, -1, -1)
'''
NAMES = ("plugin_global", "plugin_tokens", "plugin_local")
TINY_UNET = dict(block_out_channels=[16, 32], attention_heads=[1, 2], layers_per_block=1,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], context_dim=16, local_embed_channels=4,
                 sample_size=32)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    import decomposers.registry as registry

    site = tmp_path_factory.mktemp("site")
    (site / "fake_composer_plugin.py").write_text(PLUGIN)
    info = site / "fake_composer_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-composer-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [composer.decomposers]
        plugin_global = fake_composer_plugin:MeanColour
        plugin_tokens = fake_composer_plugin:Quadrants
        plugin_local = fake_composer_plugin:Redness
        """))
    sys.path.insert(0, str(site))
    registry._plugins_loaded = False  # discover again, now that the distribution is on the path
    yield registry
    sys.path.remove(str(site))
    for name in NAMES:
        registry._REGISTRY.pop(name, None)
    registry._plugins_loaded = False


@pytest.mark.parametrize("name", NAMES)
def test_a_plugin_of_each_kind_trains_a_step_and_samples(installed_plugin, name, tmp_path_factory):
    assert name in installed_plugin.list_decomposers()
    root = tmp_path_factory.mktemp("plugin-shards")
    write_scene_shards(root, 8, 64, seed=1, shard_size=8, progress=False)
    cfg = load_config([], [])
    cfg.output_dir = str(root / "run")
    cfg.data.shards = [str(root / "scenes-*.tar")]
    cfg.data.resolution, cfg.data.batch_size, cfg.data.num_workers, cfg.data.shuffle_buffer = 32, 4, 0, 8
    cfg.data.extras = []
    cfg.decomposers.enabled = [name, "palette"]
    cfg.model.overrides = dict(TINY_UNET)
    cfg.dropout.default_p = 0.0  # the plugin's adapter must receive gradients in this one step
    cfg.dropout.p_drop_all = 0.0
    cfg.sample.steps = 2
    for key, value in dict(total_images=4, checkpoint_every_images=0, sample_every_images=0, progress=False,
                           tensorboard=False, mixed_precision="no", warmup_images=0).items():
        cfg.train[key] = value
    summary = train(cfg)
    assert summary["step"] == 1 and summary["skipped_steps"] == 0
    pipe = ComposerPipeline.from_pretrained(summary["pipeline"])
    assert name in pipe.unet.accepted_conditions
    adapter_weights = [p for n, p in pipe.unet.named_parameters() if name in n]
    assert adapter_weights, f"{name} has no adapter in the model"
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, output_type="pt", progress=False, precision="fp32", guidance_scale=1.0)
    with_plugin = pipe(images={name: image}, generator=torch.Generator().manual_seed(1), **kwargs).images
    without = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert with_plugin.shape == (1, 3, 32, 32)
    assert not torch.allclose(with_plugin, without), f"{name} does not change the sample"
