"""The LightningModule and its optimizers and LR schedules."""
