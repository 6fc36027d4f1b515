"""GPU side, in three wings: the VAP model (`gpu.vap`, split over GPUs by `gpu.parallel`), the
generation service and its Modal app (`gpu.service`), and offline tools (`gpu.tools`)."""
