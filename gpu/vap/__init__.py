"""Video-As-Prompt (VAP) on Wan2.1-I2V-14B, the model wing: transformer, pipeline, attention,
loading, the released configs and their geometry, the split the model declares, and the tiny
offline build and memory footprint."""
