"""The worker: the agent talks to the coordinator; the trainer runs the task on the local partition."""
