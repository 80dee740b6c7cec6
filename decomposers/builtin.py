"""Imports every built-in decomposer module so that they register themselves."""

import decomposers.caption  # noqa: F401
import decomposers.depth  # noqa: F401
import decomposers.image_embedding  # noqa: F401
import decomposers.instances  # noqa: F401
import decomposers.intensity  # noqa: F401
import decomposers.masking  # noqa: F401
import decomposers.palette  # noqa: F401
import decomposers.sketch  # noqa: F401
import decomposers.slots  # noqa: F401
