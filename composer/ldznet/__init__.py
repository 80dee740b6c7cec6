"""LD-ZNet (Pnvr et al., ICCV 2023) in the framework: where a condition acts, masks from phrases, segmentation.

- ``composer.ldznet.attribution``: attribution maps, |eps(x_t, base + c) - eps(x_t, base)| per pixel, averaged
  over noise levels and noise draws, for every condition of an image; and their picture sheet.
- ``composer.ldznet.zeroshot``: a phrase's map (the caption with the phrase against the caption without it) and
  the binary mask thresholded from it, with no training.

The package imports nothing heavy here: import the modules themselves.
"""
