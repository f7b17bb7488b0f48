"""``trainer.native_embedding_adamw``: the fused AdamW step of the word embedding, by rows.

The word embedding is half of MiniLM's 22.7M parameters, and AdamW reads and writes its weights
and both moments every step (28 bytes a parameter) although a fine-tuning run's batches only ever
touch a minority of its rows. A row that has never had a non-zero gradient has both moments exactly
zero, so its AdamW update is exactly the weight decay alone (the Adam term is 0 / (0 + eps)).
``engine/native/adamw_rows.c`` steps the embedding row by row: rows that have had a gradient take
ATen's fused AdamW arithmetic, the others only the decay multiply (8 of the 28 bytes, after a read
of their gradient row, unless the sparse gradient's buffer lists the rows it wrote:
:func:`engine.embedding_grad.nonzero_rows`). The results are those of
``torch.optim.AdamW(fused=True)`` bit for bit (tested), and the optimizer is that class with the
same ``state_dict``: the embedding is taken out of the fused step by a step pre-hook (its ``.grad``
set aside, so the fused kernel skips it) and stepped by the library in the post-hook, on the same
``state`` entries torch would make. On this project's Zen 5 CPU, MRPC training: the optimizer step
12.0-13.2 -> 7.7-8.2 ms over the first 100 steps, 11.7-14.1 -> 10.1-10.9 ms in the second epoch
(MRPC's training set uses 11563 of the 30522 word pieces, so the gain shrinks as rows activate).

Where the sparse gradient lists its rows, the decay of the rows no gradient has reached waits until
the row is read (:class:`LazyDecay`): the same multiplies, made when the row is looked up, listed by
a step or saved, instead of a pass over ~19-30k rows every step (0.82 -> 0.03 ms for the kernel alone).

Which rows are active is kept in one byte a row, and rebuilt from the moments (a row is active where
either moment is non-zero) whenever the moments were replaced or written by anything else since the
library's last step (``load_state_dict`` on resume, for one). CPU training with a fused AdamW and no
fp16 loss scaler (which owns the step's ``found_inf``); no amsgrad, no maximize.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch
from torch import nn

from engine import native_masks
from engine.embedding_grad import nonzero_rows
from engine.errors import EngineError

SOURCE = Path(__file__).with_name("native") / "adamw_rows.c"
FLAGS = ("-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-lm")
SETTING = "trainer.native_embedding_adamw"


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.engine_adamw_rows.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_double] * 8 + [ctypes.c_int]
    )
    library.engine_adamw_rows.restype = ctypes.c_int64
    library.engine_catch_up_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    library.engine_catch_up_rows.argtypes += [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int]
    library.engine_catch_up_rows.restype = ctypes.c_int64
    check(library, path)
    return library


def why_not(optimizer: torch.optim.Optimizer, device: torch.device | str, fp16: bool) -> str | None:
    """Why the library cannot step this run's embedding (None: it can)."""
    if torch.device(device).type != "cpu":
        return "it steps CPU tensors"
    if type(optimizer) is not torch.optim.AdamW or not optimizer.defaults.get("fused"):
        return f"the optimizer is {type(optimizer).__name__} without fused=True (set optim.fused=true)"
    if fp16:
        return "fp16's gradient scaler owns the step's found_inf"
    if any(group.get("amsgrad") or group.get("maximize") for group in optimizer.param_groups):
        return "amsgrad and maximize are not in its arithmetic"
    return None


def use_native_embedding_adamw(
    setting: bool | None, optimizer: torch.optim.Optimizer, device: torch.device | str, fp16: bool
) -> tuple[Path | None, ctypes.CDLL | None]:
    """``trainer.native_embedding_adamw``: the library (its path and itself) where the run's embedding
    takes it, else (None, None). null: on where it applies and builds; true where it cannot apply is an error."""
    if setting is False:
        return None, None
    reason = why_not(optimizer, device, fp16)
    if reason is not None:
        if setting:
            raise EngineError(f"{SETTING}=true: {reason}; use null or false")
        return None, None
    return native_masks.built_library(setting, SETTING, SOURCE, FLAGS, load, "the embedding takes the fused step")


def enable_embedding_adamw(
    optimizer: torch.optim.Optimizer,
    hf_model: nn.Module,
    library: ctypes.CDLL,
    required: bool = False,
    lazy_decay: bool = True,
) -> EmbeddingRowsStep | None:
    """Step ``hf_model``'s input embedding with ``library`` (None where it has no trainable
    ``nn.Embedding`` among the optimizer's parameters: an error when ``required``). ``lazy_decay``:
    the rows no gradient has reached take their weight decay when next read (:class:`LazyDecay`),
    on the steps whose gradient lists its rows (the sparse embedding gradient's)."""
    embedding = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    weight = embedding.weight if isinstance(embedding, nn.Embedding) else None
    in_optimizer = weight is not None and any(p is weight for g in optimizer.param_groups for p in g["params"])
    if not in_optimizer:
        if required:
            raise EngineError(f"{SETTING}=true: the model has no trainable input nn.Embedding in the optimizer")
        return None
    # A weight another module also reads (tied to an output layer) would be read there un-decayed.
    shared = sum(p is weight for _, p in hf_model.named_parameters(remove_duplicate=False)) > 1
    return EmbeddingRowsStep(optimizer, weight, library, embedding if lazy_decay and not shared else None)


class EmbeddingRowsStep:
    """Steps ``weight`` (a parameter of ``optimizer``, a fused ``torch.optim.AdamW``) with the library,
    from the optimizer's own step hooks; the rest of the parameters take the fused step as before."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        weight: nn.Parameter,
        library: ctypes.CDLL,
        embedding: nn.Module | None = None,
    ) -> None:
        self.optimizer, self.weight, self.library = optimizer, weight, library
        self.group()  # exactly one group holds it
        self.active = torch.zeros(weight.shape[0] if weight.ndim == 2 else 0, dtype=torch.uint8)
        # The lazily applied decay: with the module that looks the rows up (``embedding``) only.
        self.lazy: LazyDecay | None = None
        if embedding is not None and weight.ndim == 2:
            self.lazy = LazyDecay(weight.shape[0])
            embedding.register_forward_pre_hook(self._before_lookup)
            embedding.register_state_dict_pre_hook(lambda module, prefix, keep_vars: self.catch_up())
            embedding.register_load_state_dict_pre_hook(self._before_load)
        self.active_rows = 0
        self._known: tuple | None = None  # the moments as the library left them: (pointers, versions)
        self._pending: tuple[torch.Tensor, float, torch.Tensor | None] | None = None
        optimizer.register_step_pre_hook(self._set_aside)
        optimizer.register_step_post_hook(self._step)

    def catch_up(self, ids: torch.Tensor | None = None) -> None:
        """The weight's rows among ``ids`` (None: all) as the steps so far left them (lazy decay)."""
        if self.lazy is not None:
            self.lazy.catch_up(self.library, self.weight, self.active, ids)

    def _before_lookup(self, module: nn.Module, args: tuple) -> None:
        if self.lazy is not None and self.lazy.pending and args and isinstance(args[0], torch.Tensor):
            self.catch_up(args[0].reshape(-1))

    def _before_load(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        if self.lazy is not None and prefix + "weight" in state_dict:  # the rows will be as saved
            self.lazy.restart()

    def group(self) -> dict:
        """The parameter group holding the weight, looked up each step: ``load_state_dict`` (resume,
        Accelerate's device placement) replaces the group dicts, and the scheduler sets the new ones' lr."""
        groups = [group for group in self.optimizer.param_groups if any(p is self.weight for p in group["params"])]
        if len(groups) != 1:
            raise EngineError(f"{SETTING}: the embedding is in {len(groups)} of the optimizer's parameter groups")
        return groups[0]

    def _takes(self, grad: torch.Tensor | None) -> bool:
        w = self.weight
        return (
            grad is not None
            and not grad.is_sparse
            and w.ndim == 2
            and w.dtype == grad.dtype == torch.float32
            and w.device.type == grad.device.type == "cpu"
            and w.is_contiguous()
            and grad.is_contiguous()
        )

    def _set_aside(self, optimizer, args, kwargs) -> None:
        grad = self.weight.grad
        self._pending = None
        if not self._takes(grad):
            if grad is not None:  # the fused step takes it
                self.catch_up()  # it decays every row: those owing factors take them first
                self._known = None  # and it writes the moments without a version bump: rebuild the rows
            return
        scale = getattr(optimizer, "grad_scale", None)  # trainer.clip_in_step's, read before its hook drops it
        rows = nonzero_rows(grad)  # the sparse gradient buffer's written rows: the others are zero
        self._pending = (grad, float(scale) if scale is not None else 0.0, rows)
        self.weight.grad = None  # the fused step skips a parameter without a gradient

    def _step(self, optimizer, args, kwargs) -> None:
        if self._pending is None:
            return
        grad, scale, rows = self._pending
        self._pending = None
        self.weight.grad = grad
        step, avg, sq = next_step(optimizer, self.weight, SETTING)
        lazy = self.lazy if rows is not None else None
        known = self._known == self._fingerprint(avg, sq)  # else replaced or written since
        if lazy is None or not known:
            self.catch_up()  # every row as the steps so far left it, under the active rows so far
        if not known:  # which rows are active is unknown
            self.active = ((avg != 0).any(1) | (sq != 0).any(1)).to(torch.uint8)
        self.active_rows = adamw_rows(
            self.library,
            self.weight,
            grad,
            avg,
            sq,
            self.active,
            rows,
            *hyper_parameters(self.group()),
            step,
            scale,
            lazy,
        )
        if self.active_rows < 0:
            raise EngineError(f"{SETTING}: a listed gradient row is outside the embedding's {self.weight.shape[0]}")
        self._known = self._fingerprint(avg, sq)
        if lazy is not None and lazy.pending >= lazy.COMPACT:
            self.catch_up()

    @staticmethod
    def _fingerprint(avg: torch.Tensor, sq: torch.Tensor) -> tuple:
        return avg.data_ptr(), avg._version, sq.data_ptr(), sq._version


def fused_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, setting: str) -> dict:
    """``param``'s entry in ``optimizer.state`` as the fused AdamW makes it (a library steps the
    parameter in its place): a float32 step count and two contiguous float32 moments."""
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    avg, sq = state["exp_avg"], state["exp_avg_sq"]
    if not (avg.is_contiguous() and sq.is_contiguous() and avg.dtype == sq.dtype == torch.float32):
        raise EngineError(f"{setting}: a {tuple(param.shape)} parameter's AdamW moments are not contiguous float32")
    return state


def next_step(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, setting: str
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``param``'s step count after this step (counted as the fused AdamW counts it) and its two moments."""
    state = fused_state(optimizer, param, setting)
    state["step"] += 1
    return float(state["step"]), state["exp_avg"], state["exp_avg_sq"]


def hyper_parameters(group: dict) -> tuple[float, float, float, float, float]:
    """A parameter group's lr, beta1, beta2, eps and weight decay."""
    beta1, beta2 = group["betas"]
    return float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"])


def kernel_scalars(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float, scale: float
) -> tuple:
    """The trailing arguments of the AdamW libraries' entry points: the hyper-parameters, the bias
    corrections of step ``step`` (``bias_correction1``, ``sqrt(bias_correction2)``), the grad scale
    (<= 0: none) and the thread count."""
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    return lr, beta1, beta2, eps, weight_decay, 1 - beta1**step, bias_correction2_sqrt, scale, torch.get_num_threads()


def adamw_rows(
    library: ctypes.CDLL,
    param: torch.Tensor,
    grad: torch.Tensor,
    avg: torch.Tensor,
    sq: torch.Tensor,
    active: torch.Tensor,
    rows: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    scale: float,
    lazy: LazyDecay | None = None,
) -> int:
    """One step of the library on contiguous float32 CPU matrices (``step``: the count after this
    step; ``scale`` <= 0: no grad scale); the scalars derived as ATen's fused kernel derives them.
    ``lazy`` (with ``rows`` listed): the inactive rows' decay waits (:class:`LazyDecay`). Returns the
    number of active rows, -1 where ``rows`` lists one outside the matrix."""
    if lazy is not None:
        lazy.make_room()
    active_rows = library.engine_adamw_rows(
        param.data_ptr(),
        grad.data_ptr(),
        avg.data_ptr(),
        sq.data_ptr(),
        active.data_ptr(),
        rows.data_ptr() if rows is not None else None,
        rows.numel() if rows is not None else -1,
        param.shape[0],
        param.shape[1],
        lazy.factors.data_ptr() if lazy is not None else None,
        lazy.count.data_ptr() if lazy is not None else None,
        lazy.applied.data_ptr() if lazy is not None else None,
        *kernel_scalars(lr, beta1, beta2, eps, weight_decay, step, scale),
    )
    if lazy is not None:
        lazy.stepped()
    return active_rows


class LazyDecay:
    """The word embedding's weight decay for rows no gradient has reached yet, applied when the row is
    next read instead of every step (``engine/native/adamw_rows.c``).

    Such a row's AdamW update is the decay multiply alone, yet it moved 8 bytes a parameter of memory
    every step: ~19-30k of MiniLM's 30522 rows on MRPC. Each step whose gradient lists its rows now
    appends its decay factor instead, and a row multiplies in the factors it has not had, one at a
    time in order (the same float32 products the steps would have made, so the same weights bit for
    bit), when it is next read:

    * before the embedding looks rows up (a forward pre-hook on the module: training, evaluation);
    * when a step's gradient lists it (it then takes full steps);
    * every row before a ``state_dict`` is taken (checkpoints, resume states), before a step whose
      rows are not listed, and every :data:`COMPACT` factors (the list then starts again).

    A ``load_state_dict`` that writes the weight drops the pending factors: the loaded rows are as
    their saved state left them. Code that reads the weight directly, not through the module's forward
    or its ``state_dict``, calls :meth:`EmbeddingRowsStep.catch_up` first.
    """

    COMPACT = 512  # factors kept before every row takes them (~15 ms for MiniLM's lazy rows)

    def __init__(self, rows: int) -> None:
        self.factors = torch.empty(64, dtype=torch.float32)
        self.count = torch.zeros(1, dtype=torch.int32)  # factors so far: the library appends
        self.pending = 0  # its value, read once a step
        self.applied = torch.zeros(rows, dtype=torch.int32)  # how many of them each row has had

    def make_room(self) -> None:
        """Room for the factor the next step may append."""
        if self.pending + 1 > len(self.factors):
            grown = torch.empty(2 * len(self.factors), dtype=torch.float32)
            grown[: self.pending] = self.factors[: self.pending]
            self.factors = grown

    def stepped(self) -> None:
        self.pending = int(self.count[0])

    def catch_up(
        self, library: ctypes.CDLL, weight: torch.Tensor, active: torch.Tensor, ids: torch.Tensor | None = None
    ) -> None:
        """The inactive rows of ``weight`` among ``ids`` (None: all, after which the list starts again)
        take the factors they have not had."""
        if self.pending == 0:
            return
        if ids is not None:
            ids = ids.to(torch.int64).contiguous()
        failed = library.engine_catch_up_rows(
            weight.data_ptr(),
            active.data_ptr(),
            ids.data_ptr() if ids is not None else None,
            ids.numel() if ids is not None else -1,
            weight.shape[0],
            weight.shape[1],
            self.factors.data_ptr(),
            self.pending,
            self.applied.data_ptr(),
            torch.get_num_threads(),
        )
        if failed:
            raise EngineError(f"{SETTING}: a looked-up row is outside the embedding's {weight.shape[0]}")
        if ids is None:
            self.restart()

    def restart(self) -> None:
        """No factor owed by any row."""
        self.count.zero_()
        self.applied.zero_()
        self.pending = 0


def check(library: ctypes.CDLL, path: Path) -> None:
    """A build whose step differs from ATen's fused AdamW refuses to load: four steps of a small matrix
    with a never-touched row, a row touched from the second step, weight decay and a grad scale,
    against ``torch._fused_adamw_`` itself (no optimizer object: nothing that counts steps sees them)."""
    theirs = [torch.linspace(-1, 1, 4 * 40).reshape(4, 40), torch.zeros(4, 40), torch.zeros(4, 40)]
    mine, lazily = [tensor.clone() for tensor in theirs], [tensor.clone() for tensor in theirs]
    active, lazy_active, lazy = torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), LazyDecay(4)
    for step in range(1, 5):
        grad = torch.sin(torch.arange(160.0) * step).reshape(4, 40)
        grad[0] = 0
        if step == 1:
            grad[1] = 0
        param, avg, sq = theirs
        torch._fused_adamw_(
            [param], [grad.clone()], [avg], [sq], [], [torch.tensor(float(step))], lr=1e-2, beta1=0.9,
            beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False, grad_scale=torch.tensor(1.5),
        )  # fmt: skip
        adamw_rows(
            library, mine[0], grad.clone(), mine[1], mine[2], active, None, 1e-2, 0.9, 0.999, 1e-8, 0.1, step, 1.5
        )
        listed = grad.ne(0).any(1).nonzero().flatten()  # the lazy path: rows listed, the others' decay waits
        adamw_rows(library, lazily[0], grad.clone(), lazily[1], lazily[2], lazy_active, listed, 1e-2, 0.9, 0.999,
                   1e-8, 0.1, step, 1.5, lazy)  # fmt: skip
    lazy.catch_up(library, lazily[0], lazy_active)
    if not all(torch.equal(a, b) for a, b in zip(theirs + theirs, mine + lazily, strict=True)):
        raise EngineError(f"{SETTING}: {path} does not step as torch's fused AdamW")
