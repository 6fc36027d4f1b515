"""The generation service: the Modal app and its settings, the GPU HTTP API, routing, the runner,
the engines, the local GPU server, and media I/O and safety as the service uses them."""
