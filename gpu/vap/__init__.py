"""Video-As-Prompt (VAP) on Wan2.1-I2V-14B: transformer, pipeline, tiny offline build, loading."""
