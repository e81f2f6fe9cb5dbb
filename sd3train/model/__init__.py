from sd3train.model.compile import compile_blocks  # noqa: F401  (regional compilation of the joint blocks)
from sd3train.model.mmdit import MMDiT  # noqa: F401  (the SD3 joint-attention transformer)
