"""The training loop: the Trainer subclass and its arguments, callbacks, sealed checkpoints and resume, faults, throughput, trackers and the answer-only loss."""
