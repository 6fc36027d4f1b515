"""Shared code of the VAP service: the Lambda layer, also imported by the GPU side."""
