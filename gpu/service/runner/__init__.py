"""One generation job end to end: the run, its network transport and its callbacks."""
