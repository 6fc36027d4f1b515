"""Offline tools: the memory plan and its table, FLOP counting, the scaling estimate, the GPU
bench, the parallel check and the parity check against the reference."""
