"""Training: the loop (`trainer`), optimisers and schedules (`optim`), checkpoints and their file format
(`checkpoint`), process-group glue (`distributed`), DDP / FSDP2 wrapping (`parallel`), metrics.jsonl and the
progress bar (`metrics`), and the CPU heap setting (`cpu_memory`)."""
