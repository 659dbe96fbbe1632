"""Trainer callbacks that end a run on purpose: preemption signals and non-finite gradients.

Both act at optimizer-step boundaries through the Trainer's own control flow (`should_save`,
`should_training_stop`) and end the run with a QloraError whose exit code is documented.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from types import FrameType
from typing import Any

import bitsandbytes as bnb
import torch
from omegaconf import DictConfig
from submitit import JobEnvironment
from submitit.core.utils import UncompletedJobError
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from qlora_exp.errors import NumericalError, PreemptedError, QloraError, RequeuedExit
from qlora_exp.model import packed_weight_layers, quantized_linears

log = logging.getLogger(__name__)

# SIGTERM: what schedulers send first (SLURM, Kubernetes); SIGUSR1: SLURM's `--signal` warning.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def submitit_signal() -> signal.Signals | None:
    """The signal submitit sends a job it runs before preemption or timeout (SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another); None outside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return signal.Signals["SIG" + JobEnvironment.USR_SIG]


class PreemptionCallback(TrainerCallback):
    """On SIGTERM/SIGUSR1: finish the current step, save a checkpoint, raise PreemptedError (exit 75).

    Inside a submitit job (hydra/launcher=submitit_local, slurm) submitit's own preemption/timeout
    signal is caught too; after the checkpoint is saved, submitit's handler is called, which has the
    launcher resubmit the same job (the same job directory) and requeues it: the requeued job resumes
    from that checkpoint (qlora_exp/run/resume.py). Requeueing stays submitit's: it alone knows the
    cluster, and it counts timeouts against `max_num_timeout`.

    The handlers are installed only while training runs (on_train_begin .. on_train_end); outside
    that window a signal has its previous effect (submitit's handler requeues at once, from the last
    checkpoint), since there is no step boundary to wait for.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._chained = submitit_signal()
        self._handover: Any = None  # submitit's handler of its signal, called after the save

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: saving inside a signal handler could interrupt a half-written tensor.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self._signum = signum
            log.warning(
                "%s received: saving a checkpoint at the end of this step, then exiting", self.signal_name
            )

    def install(self) -> None:
        """Route the preemption signals to this callback (main thread only, as Python requires)."""
        if self._previous:  # on_train_begin again: auto_find_batch_size restarts the loop
            return
        signals = (*PREEMPTION_SIGNALS, self._chained) if self._chained else PREEMPTION_SIGNALS
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._handover = self._previous.get(self._chained) if self._chained else None

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.install()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        stop = self.signal_name is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            # Ranks may get the signal at different steps; all stop at the same one or the save hangs.
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            self.signal_name = self.signal_name or ("a preemption signal on another rank" if stop else None)
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.signal_name is None:
            return
        saved = f"checkpoint saved at step {state.global_step} of {state.max_steps}"
        self.restore()
        if self._signum == self._chained and callable(self._handover):
            self._hand_over(self._handover, saved)
        raise PreemptedError(
            f"preempted by {self.signal_name}: {saved}. Fix: rerun the same command with hydra.run.dir "
            "set to this run's directory (or resume=RUN_DIR) to continue"
        )

    def _hand_over(self, handler: Any, saved: str) -> None:
        """Let submitit's handler requeue the job now that the checkpoint exists; it exits the
        process (its exit code tells its local executor to rerun the job)."""
        log.warning("%s: %s; handing over to submitit to requeue the job", self.signal_name, saved)
        try:
            handler(self._signum, None)
        except UncompletedJobError as exc:  # e.g. timed out more than max_num_timeout times
            raise PreemptedError(
                f"preempted by {self.signal_name}: {saved}; submitit did not requeue the job ({exc}). "
                "Fix: rerun the same sweep command with the same hydra.sweep.dir (or raise "
                "hydra.launcher.max_num_timeout)"
            ) from exc
        except SystemExit as exc:
            raise RequeuedExit(exc.code, f"requeued by submitit after {self.signal_name}: {saved}") from exc

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.restore()


class NonFiniteGuard(TrainerCallback):
    """Stops training when gradients are NaN/inf for `patience` consecutive optimizer steps.

    A NaN or inf loss makes the gradients non-finite too, so the gradient norm before each optimizer
    step covers both. The norms stay on the device and are read back, in one sync, only at the end of
    a step that logs, evaluates, saves or stops: reading each one back at once would make the host
    wait for every backward, and the GPU then idles while the host queues the next step. So a run
    stops at the first such step once the streak reaches `patience` (trainer.logging_steps apart at
    most; the message names the step where it did), nothing of the poisoned weights is saved, and no
    checkpoint is written while a streak lasts (fp16 loss scaling skips overflowing steps by itself
    when patience > 1), so a resume never starts from them.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.streak = 0
        self.pending: list[tuple[int, torch.Tensor]] = []  # (optimizer step, its gradient norm)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: torch.nn.Module = kwargs["model"]
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.pending.append((state.global_step + 1, norm))

    def settle(self, args: TrainingArguments) -> None:
        """Read the pending norms back and update the streak; raise once it reaches `patience`."""
        if not self.pending:
            return
        steps, norms = zip(*self.pending, strict=True)
        self.pending = []
        values = torch.stack([n.to(norms[-1].device, torch.float32) for n in norms]).tolist()
        for step, norm in zip(steps, values, strict=True):
            if math.isfinite(norm):
                self.streak = 0
                continue
            self.streak += 1
            log.warning(
                "step %d: gradient norm is %s (%d of %d allowed)", step, norm, self.streak, self.patience
            )
            if self.streak >= self.patience:
                raise NumericalError(
                    f"step {step}: loss or gradient norm is {norm} for {self.streak} consecutive optimizer "
                    f"step(s) (trainer.nan_guard_patience={self.patience}); training stopped, no adapter "
                    f"saved. Fix: lower trainer.learning_rate (now {args.learning_rate:g}), "
                    "keep trainer.max_grad_norm > 0, check the data for empty targets, or prefer bf16 to fp16"
                )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if (
            control.should_log
            or control.should_evaluate
            or control.should_save
            or control.should_training_stop
        ):
            self.settle(args)
        if self.streak:
            control.should_save = False
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.settle(args)


class QuantizedWeightGuard(TrainerCallback):
    """Fails the run if any 4-bit layer was repacked by bitsandbytes' CPU inference path.

    `model.disable_cpu_weight_repacking` keeps every layer off that path (see why there); this checks,
    at every step, evaluation and the end of training, that it held: a repacked layer passes no
    gradient and drifts at each checkpoint, so training on would silently give a wrong adapter. The
    check reads one flag per 4-bit layer (hundreds of attribute reads per step).
    """

    def __init__(self) -> None:
        self.layers: list[bnb.nn.Linear4bit] = []

    def check(self, when: str) -> None:
        """Raise if any watched layer is repacked; `when` names the moment for the message."""
        packed = packed_weight_layers(self.layers)
        if packed:
            raise QloraError(
                f"{when}: {len(packed)} of {len(self.layers)} 4-bit layers were repacked in place by "
                "bitsandbytes' CPU inference path (AVX512-BF16), which passes no gradient and alters the "
                "base weights at each save; training stopped, no adapter saved. Fix: report this with "
                "train.log and `pip list` (a bitsandbytes version whose repacking switch qlora-exp does "
                "not know); meanwhile train on a GPU or a CPU without AVX512-BF16"
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.layers = quantized_linears(kwargs["model"])

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.check(f"step {state.global_step + 1}")

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.check(f"evaluation at step {state.global_step}")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.check("end of training")


def oom_advice(cfg: DictConfig) -> str:
    """A CUDA out-of-memory message with fixes computed from the run's own settings."""
    batch_size = int(cfg.trainer.per_device_train_batch_size)
    accumulation = int(cfg.trainer.gradient_accumulation_steps)
    max_length = int(cfg.data.max_length)
    fixes = []
    if batch_size > 1:
        fixes.append(
            f"trainer.per_device_train_batch_size={batch_size // 2} "
            f"trainer.gradient_accumulation_steps={accumulation * 2} (same effective batch)"
        )
    fixes.append(f"data.max_length={max(16, max_length // 2)} (now {max_length})")
    if not cfg.model.gradient_checkpointing:
        fixes.append("model.gradient_checkpointing=true")
    fixes.append("trainer.auto_find_batch_size=true (halves the batch on OOM; changes the effective batch)")
    return "CUDA out of memory. Fix, one of: " + "; ".join(fixes)
