"""A callback for the resume tests: the process kills itself (SIGKILL, no clean-up) when a given step begins, after
the checkpoint of the step before was written."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
