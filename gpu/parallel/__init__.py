"""One VAP forward over N processes/GPUs: sequence parallel (Ulysses all-to-all over heads).

`sequence` applies the transformer's declared split (`gpu.vap.split_plan`): each process runs
every block on a slice of the tokens and the self-attentions exchange heads for sequence;
`layout`: the tensor layouts around the exchanges. The engine that runs a job this way is
`gpu.service.engines.sequence_parallel`. docs/parallel.md has the design.
"""
