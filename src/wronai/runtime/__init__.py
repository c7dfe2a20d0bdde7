"""Where the run executes: the device plan, distributed launch, the memory estimate, activation checkpointing and the CPU heap."""
