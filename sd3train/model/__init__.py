from sd3train.model.mmdit import MMDiT  # noqa: F401  (the SD3 joint-attention transformer)
