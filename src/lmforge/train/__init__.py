"""Training: the one loop (`loop.Trainer`, `loop.train`), the library entry that trains from a
config and writes the report (`run.run_training`), the tasks and their contract (`tasks.Task`),
the optimizer and its update, DDP / FSDP wrapping, logging and evaluation; one process per run
folder (`setup.hold_run_folder`), the architecture a checkpoint fixes (`init_from`), and what a
resume checks (`resume`: a finished run, changed data)."""
