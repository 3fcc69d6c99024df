"""One train/eval engine for the whole zoo.

>>> from vizoo.engine import train, evaluate
>>> result = train(model="mobilenetv2_100_evos0", data="digits", img_size=32, epochs=10, out="runs/digits")
>>> evaluate(result.best_path, data="digits")["top1"]

`Trainer` runs one loop for every task; a task adapter (`vizoo.engine.tasks`) says what a batch,
the loss and the metrics are. Classification is implemented; detection, diffusion finetuning
and continual learning plug in through the same interface.
"""
from .config import TrainConfig
from .evaluate import evaluate
from .tasks import TASKS, ClassificationTask, StepOutput, TaskAdapter, TaskData, register_task
from .trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["train", "evaluate", "Trainer", "TrainConfig", "TrainResult", "NonFiniteLossError", "TaskAdapter",
           "TaskData", "StepOutput", "ClassificationTask", "register_task", "TASKS"]
