"""The coordinator: worker registry, round state machine, the training loop and its HTTP API."""
