"""What survives a crash: SQLite state (runs, rounds, workers, metrics) and atomic checkpoints."""
