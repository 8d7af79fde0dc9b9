"""TrainingSettings: every knob of a training run is a field (and a CLI flag), never a subclass."""

from __future__ import annotations

from dataclasses import dataclass, replace

from autoseg.errors import SettingsError

SETTINGS_FORMAT = 1


@dataclass(frozen=True)
class TrainingSettings:
    """Defaults follow nnU-Net v2 (1000 epochs x 250 iterations, SGD 1e-2 Nesterov 0.99, poly 0.9) except
    `init`: the heads start at the class prior, which learns every class early for every seed measured
    (docs/training.md); `init="nnunet"` gives nnU-Net's initial weights exactly."""

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    foreground_oversample: float = 0.33
    augmentation: str = "default"
    batch_size: int | None = None  # None: the plan's
    amp: bool = True
    compile: bool = False
    channels_last: bool = False
    checkpoint_every: int = 50
    seed: int = 12345
    workers: int | None = None  # None: from the CPUs allotted to this process
    deep_supervision: bool = True
    #: How the output heads start (training/init.py): "prior" (class frequencies) or "nnunet" (He init).
    init: str = "prior"
    #: Iterations over which the learning rate rises linearly from lr / warmup to lr (0: none).
    warmup_iterations: int = 0
    #: Pool Dice sums over the batch (True), per sample (False), or as the plan says (None).
    batch_dice: bool | None = None
    #: Arithmetic of the steps: auto (mixed precision on CUDA; on CPU bf16 where it is native, measured
    #: equivalent in issue 16, else fp32), fp32, or bf16 (autocast; on CPU fast only with native bf16).
    #: `amp=False` = fp32.
    precision: str = "auto"
    format: int = SETTINGS_FORMAT

    def validated(self) -> TrainingSettings:
        """Self, after checking ranges; raises SettingsError naming the flag."""
        checks = {
            "--epochs": self.epochs >= 1, "--iterations-per-epoch": self.iterations_per_epoch >= 1,
            "--val-iterations": self.val_iterations >= 0, "--lr": self.initial_lr > 0,
            "--checkpoint-every": self.checkpoint_every >= 1,
            "--batch-size": self.batch_size is None or self.batch_size >= 1,
            "--oversample": 0.0 <= self.foreground_oversample <= 1.0,
            "--warmup": self.warmup_iterations >= 0,
            "--precision": self.precision in ("auto", "fp32", "bf16"),
        }
        for flag, ok in checks.items():
            if not ok:
                raise SettingsError(f"{flag} is out of range", hint=f"see `autoseg train --help` for {flag}")
        from autoseg.training.init import OUTPUT_INITS

        OUTPUT_INITS.get(self.init)  # an unknown --init fails here, with "did you mean"
        return self

    def with_epochs(self, epochs: int) -> TrainingSettings:
        return replace(self, epochs=epochs)


def poly_lr(initial_lr: float, epoch: int, total_epochs: int, exponent: float = 0.9) -> float:
    """Polynomial decay from `initial_lr` at epoch 0 towards 0 at `total_epochs`."""
    return initial_lr * (1 - epoch / total_epochs) ** exponent


def warmup_factor(iteration: int, warmup_iterations: int) -> float:
    """Learning-rate multiplier at global training iteration `iteration` (0-based): (i + 1) / warmup, then 1."""
    if iteration >= warmup_iterations:
        return 1.0
    return (iteration + 1) / warmup_iterations
