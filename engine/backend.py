"""The device seam: one small interface, two implementations.

The verbs mirror Accelerate's (``prepare``, ``backward``, ``autocast``,
``clip_grad_norm_``, ``gather_for_metrics``, ``main_process_first``, ...), so the
loop reads the same whichever path runs it and never branches on the backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from engine.config import BackendConfig, BackendName, MixedPrecision
from engine.model import plain_state_dict, unwrap

LAUNCH_VARIABLES = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU")


def launched_distributed() -> bool:
    """True when ``accelerate launch`` or ``torchrun`` started this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def choose_backend(config: BackendConfig) -> BackendName:
    name = BackendName(config.name)
    if name != BackendName.auto:
        return name
    return BackendName.accelerate if launched_distributed() else BackendName.manual


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 in hardware (AVX-512 BF16 / AMX CPUs, Ampere+ GPUs):
    elsewhere bf16 is emulated, and slower than fp32."""
    if device_type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no emulation to exclude
            return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def native_fp16(device_type: str) -> bool:
    """Whether ``device_type`` computes fp16 in hardware: GPUs with tensor cores (Volta, compute
    capability 7.0, and later), CPUs with AVX-512 FP16 / AMX-FP16."""
    if device_type == "cuda":
        return torch.cuda.get_device_capability() >= (7, 0)
    if device_type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def resolve_mixed_precision(precision: MixedPrecision, device_type: str, inference: bool = False) -> MixedPrecision:
    """``auto`` becomes bf16 where ``device_type`` has native bf16 arithmetic, else ``no``
    (emulated bf16 is slower than fp32). Training never gets fp16 from ``auto``: it needs loss
    scaling. Inference has no gradients to scale, so there ``auto`` gives fp16 on GPUs with fp16
    tensor cores but no native bf16 (Volta, Turing)."""
    precision = MixedPrecision(precision)
    if precision != MixedPrecision.auto:
        return precision
    if native_bf16(device_type):
        return MixedPrecision.bf16
    if inference and device_type == "cuda" and native_fp16(device_type):
        return MixedPrecision.fp16
    return MixedPrecision.no


def autocast_dtype(precision: MixedPrecision) -> torch.dtype | None:
    return {MixedPrecision.bf16: torch.bfloat16, MixedPrecision.fp16: torch.float16}.get(precision)


class _ScaledOptimizer(torch.optim.Optimizer):
    """fp16 on the manual path: ``step`` goes through the grad scaler, as Accelerate's does; an
    ``Optimizer``, as Accelerate's wrapper is, so that a learning-rate schedule takes it."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        # No Optimizer.__init__: the parameter groups, defaults and state are the inner optimizer's.
        self.optimizer = optimizer
        self.scaler = scaler
        self.unscaled = False

    def step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.unscaled = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @property
    def state(self) -> Any:
        return self.optimizer.state


class ManualBackend:
    """One process: batches moved with ``.to(device)``, ``loss.backward()``."""

    name = "manual"
    sharded = False
    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, config: BackendConfig, mixed_precision: MixedPrecision, inference: bool = False) -> None:
        use_cuda = config.use_cuda and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.mixed_precision = resolve_mixed_precision(mixed_precision, self.device.type, inference)
        self._dtype = autocast_dtype(self.mixed_precision)
        self._scaler = torch.amp.GradScaler(self.device.type) if self.mixed_precision == MixedPrecision.fp16 else None
        self._optimizers: list[_ScaledOptimizer] = []

    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        prepared = []
        for obj in objects:
            if isinstance(obj, nn.Module):
                obj = obj.to(self.device)
            elif isinstance(obj, torch.optim.Optimizer) and self._scaler is not None:
                obj = _ScaledOptimizer(obj, self._scaler)
                self._optimizers.append(obj)
            prepared.append(obj)
        return tuple(prepared)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def backward(self, loss: torch.Tensor) -> None:
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._dtype)

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        for optimizer in self._optimizers:
            if not optimizer.unscaled:
                self._scaler.unscale_(optimizer.optimizer)  # type: ignore[union-attr]
                optimizer.unscaled = True
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any_process(self, flag: bool) -> bool:
        return bool(flag)

    def skip_first_batches(self, loader: Any, num_batches: int) -> Any:
        from engine.data import skip_first_batches

        return skip_first_batches(loader, num_batches)

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        yield

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The transformers model's full weights, on the CPU (for the best checkpoint and the state)."""
        return plain_state_dict(model)

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load the transformers model's full weights into the prepared ``model``."""
        unwrap(model).load_state_dict(state)

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    def end(self) -> None:
        pass


class AccelerateBackend:
    """``accelerator.prepare`` / ``accelerator.backward``; many processes under ``accelerate launch``."""

    name = "accelerate"

    def __init__(self, config: BackendConfig, mixed_precision: MixedPrecision, inference: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedType

        # Without CUDA, cpu=True turns a multi-process launch into gloo DDP on the CPU.
        cpu = not (config.use_cuda and torch.cuda.is_available())
        self.mixed_precision = resolve_mixed_precision(mixed_precision, "cpu" if cpu else "cuda", inference)
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=self.mixed_precision.value,
            # The loop builds the schedule for this process's own optimizer steps.
            step_scheduler_with_optimizer=False,
            dataloader_config=DataLoaderConfiguration(even_batches=True),
        )
        self.device = self.accelerator.device
        # FSDP (chosen in `accelerate config`): weights and optimizer state are sharded across ranks.
        self.sharded = self.accelerator.distributed_type == DistributedType.FSDP
        self.num_processes = self.accelerator.num_processes
        self.process_index = self.accelerator.process_index
        self.is_main_process = self.accelerator.is_main_process

    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        prepared = self.accelerator.prepare(*objects)
        return prepared if isinstance(prepared, tuple) else (prepared,)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Prepared loaders already place batches; loaders that were not prepared still work.
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return self.accelerator.no_sync(model)

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(tensor)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def any_process(self, flag: bool) -> bool:
        """True on every process when it is true on any: one decision for all ranks."""
        if self.num_processes == 1:
            return bool(flag)
        return bool(self.reduce_sum(torch.tensor(float(flag), device=self.device)) > 0)

    def skip_first_batches(self, loader: Any, num_batches: int) -> Any:
        return self.accelerator.skip_first_batches(loader, num_batches)

    def broadcast_object(self, obj: Any) -> Any:
        if self.num_processes == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        holder = [obj]
        broadcast_object_list(holder, from_process=0)
        return holder[0]

    def main_process_first(self) -> contextlib.AbstractContextManager:
        return self.accelerator.main_process_first()

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The transformers model's full weights, on the CPU, on rank 0 (the others get an empty dict).
        Every rank calls it: under FSDP the shards are gathered."""
        if not self.sharded:
            return plain_state_dict(model) if self.is_main_process else {}
        gathered = self.accelerator.get_state_dict(model)  # ClassifierWithLoss's keys: "hf_model.<name>"
        return {k.removeprefix("hf_model."): v.detach().cpu().clone() for k, v in gathered.items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load the transformers model's full weights into the prepared ``model`` (every rank, under FSDP)."""
        if not self.sharded:
            unwrap(model).load_state_dict(state)
            return
        from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT):
            model.load_state_dict({f"hf_model.{k}": v for k, v in state.items()})

    def print(self, *args: Any, **kwargs: Any) -> None:
        self.accelerator.print(*args, **kwargs)

    def end(self) -> None:
        from accelerate.state import AcceleratorState

        self.accelerator.end_training()
        # Let a later train() in this process (a sweep, a test) choose other settings.
        AcceleratorState._reset_state()


Backend = ManualBackend | AccelerateBackend


def make_backend(config: BackendConfig, mixed_precision: MixedPrecision, inference: bool = False) -> Backend:
    """``inference``: a run that only evaluates (``mixed_precision=auto`` may then pick fp16)."""
    if choose_backend(config) == BackendName.accelerate:
        return AccelerateBackend(config, mixed_precision, inference)
    return ManualBackend(config, mixed_precision, inference)
