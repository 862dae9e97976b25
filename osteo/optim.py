"""The optimizers osteo trains with: Adam or AdamW, updated by PyTorch's fused kernel on PyTorch.

Keras' Adam on PyTorch is a chain of ``torch._foreach_*`` calls, several of which allocate
a copy of every moment: measured as half of a ConvNeXtTiny step on the CPU
(``benchmarks/README.md``). :class:`FusedAdam` and :class:`FusedAdamW` keep Keras'
optimizers (state, schedules, saving, resume) and only replace the update.
"""

from __future__ import annotations

import math

import keras
import numpy as np


def make_optimizer(kind: str, learning_rate, weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """Adam or AdamW; on PyTorch the same optimizers updated by PyTorch's fused kernel."""
    torch = keras.backend.backend() == "torch"
    adam = FusedAdam if torch else keras.optimizers.Adam
    adamw = FusedAdamW if torch else keras.optimizers.AdamW
    if kind == "adamw":
        return adamw(learning_rate=learning_rate, weight_decay=weight_decay)
    return adam(learning_rate=learning_rate)


class _Fused:
    """Adam's update as PyTorch's fused kernel (one pass over each tensor) instead of Keras'.

    Keras' Adam on PyTorch is a chain of ``torch._foreach_*`` calls, several of which
    allocate a new copy of every moment: measured here as half of a ConvNeXtTiny step on
    the CPU (``benchmarks/README.md``). The state stays Keras': the moments are the
    optimizer's own variables (saved, restored on resume, counted as before), the step is
    ``iterations``, the learning rate comes from its schedule, and the update is Keras'
    exactly: PyTorch adds epsilon to the bias-corrected ``sqrt(v)``, so it is given
    Keras' epsilon divided by ``sqrt(1 - beta_2^t)``. The step count is kept on the host
    too (read once from ``iterations``), so no step waits for the device.
    """

    _kernel = "_fused_adam_"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Keras advances the step counter by adding a Python 1 (a host-to-device copy that waits
        # for the device, see osteo.classifier.Model): advanced in place on the device instead
        counter = self._iterations
        counter.assign_add = lambda value: counter.value.add_(value)

    def _completed_steps(self) -> int:
        """``iterations`` as a host number (read from the device once, then counted here)."""
        if getattr(self, "_host_step", None) is None:
            self._host_step = int(self.iterations.value)  # once: restored by a resume, or 0
        return self._host_step

    def _get_current_learning_rate(self):
        # a cosine schedule evaluated on the host, as a Python number the kernel takes by value:
        # Keras' evaluates it with device tensors made from Python numbers and an ops.cond that
        # reads its condition back (each a wait for the device)
        if isinstance(self._learning_rate, keras.optimizers.schedules.CosineDecay):
            return cosine_on_host(self._learning_rate, self._completed_steps())
        return super()._get_current_learning_rate()

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        import torch

        with torch.no_grad():
            params = [v.value for v in trainable_variables]
            index = [self._get_variable_index(v) for v in trainable_variables]
            moments = [self._momentums[i] for i in index] + [self._velocities[i] for i in index]
            for m, p in zip(moments, params + params):
                if m.value.stride() != p.stride():  # channels-last weights: the moments follow their layout
                    m.value.data = torch.empty_like(p).copy_(m.value)
            self._host_step = self._completed_steps() + 1
            t = self._host_step
            steps = getattr(self, "_step_tensors", None)
            if steps is None or len(steps) != len(params):
                steps = self._step_tensors = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
            torch._foreach_zero_(steps)  # then t: what the kernel's bias corrections read
            torch._foreach_add_(steps, float(t))
            lr = learning_rate.value if hasattr(learning_rate, "value") else learning_rate
            if not isinstance(lr, float):  # a float goes to the kernel by value
                lr = torch.as_tensor(lr, dtype=torch.float32, device=params[0].device)
            getattr(torch, self._kernel)(
                params, [g.to(p.dtype) for g, p in zip(grads, params)],
                [m.value for m in moments[: len(params)]], [v.value for v in moments[len(params):]], [], steps,
                lr=lr,
                beta1=float(self.beta_1), beta2=float(self.beta_2),
                weight_decay=float(self.weight_decay or 0.0) if self._kernel == "_fused_adamw_" else 0.0,
                eps=float(self.epsilon) / math.sqrt(1.0 - float(self.beta_2) ** t), amsgrad=False, maximize=False)


    def load_own_variables(self, store):
        super().load_own_variables(store)
        self._host_step = None  # iterations restored: read it again at the next step


class FusedAdam(_Fused, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with PyTorch's fused update (PyTorch backend only)."""


class FusedAdamW(_Fused, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with PyTorch's fused update (PyTorch backend only).

    The decoupled weight decay (``variable -= variable * weight_decay * lr``) is done by
    the kernel, in the same pass, instead of by Keras beforehand, one variable at a time.
    """

    _kernel = "_fused_adamw_"

    def _apply_weight_decay(self, variables):
        if getattr(self, "_exclude_from_weight_decay", None) or getattr(self, "_exclude_from_weight_decay_pattern", None):
            raise NotImplementedError("FusedAdamW decays every variable; use keras.optimizers.AdamW to exclude some")


def cosine_on_host(schedule: keras.optimizers.schedules.CosineDecay, step: int) -> float:
    """Keras' ``CosineDecay`` (with its warm-up) at ``step``, computed on the host in float32."""
    f = np.float32
    initial, decay, alpha = f(schedule.initial_learning_rate), f(schedule.decay_steps), f(schedule.alpha)

    def decayed(s, start):
        cosine = f(0.5) * (f(1.0) + np.cos(f(math.pi) * (s / decay)))
        return start * ((f(1.0) - alpha) * cosine + alpha)

    s = f(step)
    if schedule.warmup_target is None:
        return float(decayed(min(s, decay), initial))
    warmup, target = f(schedule.warmup_steps), f(schedule.warmup_target)
    s = min(s, decay + warmup)
    if s < warmup:
        return float((target - initial) * (s / warmup) + initial)
    return float(decayed(s - warmup, target))
