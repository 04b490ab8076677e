"""What every training loop shares:

    launch.py       the scripts' entry point; what each does before its loop (setup, data splits)
    distributed.py  process group, FSDP2, collectives, rank-0 printing
    runtime.py      precision from the hardware, seeds, the model built (meta + FSDP2), autocast
    trainer.py      the Trainer: AdamW, lr schedule, clipping, NaN guard, evaluation, checkpoints, export
    logger.py       metrics.jsonl, the progress bar, W&B
    run_dir.py      one run per out_dir: the lock, resume=never, the metrics log trimmed on resume
    checkpoints.py  DCP checkpoints with the run's identity; HF exports
"""
