"""The GPU HTTP API (docs/contracts.md): the app and the executors behind it."""
