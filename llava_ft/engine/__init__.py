"""Training engine: `run_training(cfg, ...)` on a transformers.Trainer subclass, callbacks, checkpoints.

    from llava_ft.engine import run_training
    result = run_training(cfg, work_dir="work_dirs/x", resume="auto")
"""
from llava_ft.engine.run import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
