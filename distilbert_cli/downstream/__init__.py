"""Training on downstream tasks: fine-tuning (distil finetune), task-specific distillation and its augmentation
(distil task-distill), and predicting and scoring a task's splits (finetune, task-distill, evaluate). What a task is
(its data, encoding, head, loss, metrics) is asked of `tasks`; every training step runs in `training.engine`."""
