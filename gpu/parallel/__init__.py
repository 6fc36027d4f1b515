"""One VAP job on N processes/GPUs: sequence parallel (Ulysses all-to-all over heads).

`sequence`: the split of the token streams and the all-to-all attention core the transformer
calls through its hooks; `engine`: an `Engine` that runs one job over `world_size` local
processes; `scaling`: estimated time and cost per GPU count. docs/parallel.md has the design.
"""
