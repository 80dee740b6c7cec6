"""Configuration of the data pipeline and of the synthetic scene generator (owned by composer/data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Streaming webdataset shards into batches."""

    shards: list[str] = field(default_factory=lambda: ["data/scenes/scenes-*.tar"])  # paths, globs, brace patterns or URLs
    resolution: int = 64  # output images are resolution x resolution
    crop: str = "center"  # "center" or "random"
    # a square crop of this side taken after resizing to ``resolution`` (same ``crop`` mode): an upsampler
    # trains on e.g. 64 px crops of 256 px scenes; None keeps the whole resolution x resolution image
    crop_size: int | None = None
    batch_size: int = 8
    num_workers: int = 0
    shuffle_shards: bool = True  # shuffle the shard list each epoch
    shuffle_buffer: int = 256  # sample shuffle buffer (0 disables)
    max_image_pixels: int = 64_000_000  # larger images are skipped as decompression bombs
    extras: list[str] = field(default_factory=list)  # extra members to read, e.g. ["instances", "depth", "classes"]
    # the stream stops with an error naming the shards and the skip reasons after this many skipped samples in
    # a row (or a whole pass without one usable sample), instead of streaming forever; 0 checks whole passes only
    max_consecutive_skips: int = 1000
