"""The model behind one call: on one device, or over several GPUs (sequence parallel)."""
