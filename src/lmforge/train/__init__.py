"""Training: the one loop (`loop.Trainer`, `loop.train`), the library entry that trains from a
config and writes the report (`run.run_training`), the tasks and their contract (`tasks.Task`),
the optimizer and its update, DDP / FSDP wrapping, logging and evaluation."""
