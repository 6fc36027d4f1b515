"""GPU side: the VAP model (`gpu.vap`), the generation service and the Modal app."""
