"""``trainer.bf16_weights``: the linear layers train on bf16 weights kept from float32 masters.

Under CPU bf16 autocast every ``nn.Linear`` casts its float32 weight and bias to bf16 in each
forward, and autograd casts each bf16 weight gradient back to float32 before it is accumulated into
``.grad``: 148 casts a MiniLM step that read and write its 10.8M linear parameters twice over. On
this project's Zen 5 CPU that is ~3 ms of a ~110 ms 16 x 56-token step (profiled) and most of the
13 ms this lever takes off a 1-row, 8-token step (36 -> 23 ms). Here each linear's weight and bias keep
a bf16 copy (a leaf tensor, not a parameter) that the training forward uses as it is, so neither
cast happens and the gradients stay bf16. ``engine/native/adamw_bf16.c`` then steps the float32
masters (the module's own parameters, in the optimizer and the ``state_dict`` as before) from the
bf16 gradients with ATen's fused AdamW arithmetic and writes each new master rounded to bf16 into
its copy.

Nothing numerical changes: a bf16 gradient widened to float32 is exactly what autocast's cast back
gives, and the copy equals autocast's cast of the new master, so for a given gradient scale the
weights and moments equal those of float32 weights under ``torch.optim.AdamW(fused=True)`` bit for
bit (tested). The one figure computed differently is the clipping norm of these gradients: one pass
of the library sums their squares in double (0.3 vs 1.7 ms for torch's widening copy and norm of
each), so a clipped step's factor can differ from torch's float32 norm in the last bits.

How it plugs in. Each linear's class gets a forward that, in a training forward under CPU bf16
autocast, uses the copies (evaluation, fp32 and no-grad forwards run the class's own forward on the
masters). The copies follow the masters: a master written by anything but the library
(``load_state_dict`` on resume, an in-place edit) has a new version counter, and the copy is cast
again at its next use. The optimizer stays torch's fused AdamW with the same ``state`` entries: its
fused kernel skips the masters (their ``.grad`` is None), and a step post-hook steps them with the
library. The gradient clipper (``trainer.clip_in_step``) adds the bf16 gradients' norm to the others'
and hands the clip factor to the library as its ``grad_scale``; ``zero_grad`` drops them.

Where. CPU training on the manual backend (one process: DDP reduces registered parameters' gradients
only) under bf16 autocast, with a fused AdamW (no amsgrad, no maximize) and ``trainer.clip_in_step``,
one micro-batch a step (accumulating micro-batches in bf16 would round where float32 ``.grad`` does
not), no compile. A parameter whose size is not a multiple of 16 (a 2-label head's bias) stays on
autocast's casts: ATen's fused kernel steps a tensor's last ``size % 16`` elements with scalar code
that rounds differently.
"""

from __future__ import annotations

import ctypes
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine import native_masks
from engine.errors import EngineError
from engine.first_token import mixed_class
from engine.native_adamw import fused_state, hyper_parameters, kernel_scalars

SOURCE = Path(__file__).with_name("native") / "adamw_bf16.c"
FLAGS = ("-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-lm")
SETTING = "trainer.bf16_weights"
VECTOR = 16  # ATen's fused step takes whole vectors of 16 floats; a tensor's remainder rounds otherwise


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    library.engine_adamw_bf16.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_double] * 8
    library.engine_adamw_bf16.argtypes.append(ctypes.c_int)
    library.engine_adamw_bf16.restype = None
    library.engine_bf16_norm.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    library.engine_bf16_norm.restype = ctypes.c_double
    check(library, path)
    return library


def why_not(
    optimizer: torch.optim.Optimizer,
    device: torch.device | str,
    backend_name: str,
    bf16: bool,
    grad_accum_steps: int,
    compiled: bool,
    clip_in_step: bool,
) -> str | None:
    """Why the run's linear layers cannot train on bf16 copies (None: they can)."""
    if torch.device(device).type != "cpu":
        return "it steps CPU tensors"
    if backend_name != "manual":
        return f"the {backend_name} backend reduces the parameters' own gradients across processes"
    if not bf16:
        return "the run is not under bf16 autocast (trainer.mixed_precision)"
    if type(optimizer) is not torch.optim.AdamW or not optimizer.defaults.get("fused"):
        return f"the optimizer is {type(optimizer).__name__} without fused=True (set optim.fused=true)"
    if any(group.get("amsgrad") or group.get("maximize") for group in optimizer.param_groups):
        return "amsgrad and maximize are not in its arithmetic"
    if grad_accum_steps != 1:
        return "accumulating micro-batches into bf16 gradients would round where float32 ones do not"
    if compiled:
        return "a compiled graph makes its own casts"
    if not clip_in_step:
        return "its gradient norm comes from trainer.clip_in_step, which is off"
    return None


def use_bf16_weights(setting: bool | None, *conditions) -> tuple[Path | None, ctypes.CDLL | None]:
    """``trainer.bf16_weights``: the library (its path and itself) where the run's linears take it, else
    (None, None). null: on where it applies and builds; true where it cannot apply is an error.
    ``conditions``: :func:`why_not`'s arguments."""
    if setting is False:
        return None, None
    reason = why_not(*conditions)
    if reason is not None:
        if setting:
            raise EngineError(f"{SETTING}=true: {reason}; use null or false")
        return None, None
    return native_masks.built_library(setting, SETTING, SOURCE, FLAGS, load, "the linears cast under autocast")


class Bf16Copy:
    """A float32 master parameter's bf16 copy: a leaf that collects the bf16 gradient."""

    def __init__(self, master: nn.Parameter) -> None:
        self.master = master
        self.tensor = master.detach().to(torch.bfloat16).requires_grad_(True)
        self.version: int | None = master._version  # the master's version the copy was cast from

    def current(self) -> torch.Tensor:
        """The copy, cast again first where the master was written by anything but the library."""
        if self.version != self.master._version:
            with torch.no_grad():
                self.tensor.copy_(self.master)
            self.version = self.master._version
        return self.tensor


def takes(parameter: torch.Tensor | None) -> bool:
    """Whether ``parameter`` can train on a bf16 copy: a trainable float32 CPU tensor the library
    steps as ATen does (contiguous, a whole number of 16-float vectors)."""
    return (
        isinstance(parameter, nn.Parameter)
        and parameter.requires_grad
        and parameter.dtype == torch.float32
        and parameter.device.type == "cpu"
        and parameter.is_contiguous()
        and parameter.numel() % VECTOR == 0
    )


class Bf16WeightsLinear:
    """Mixed into a linear layer's class: a training forward under CPU bf16 autocast uses the bf16
    copies of weight and bias; every other forward is the class's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = self.__dict__.get("bf16_copies")
        if copies is None or not training_forward(x):
            return super().forward(x)
        weight, bias = copies
        return F.linear(
            x,
            weight.current() if weight is not None else self.weight,
            bias.current() if bias is not None else self.bias,
        )


def training_forward(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


def enable_bf16_weights(
    optimizer: torch.optim.Optimizer, hf_model: nn.Module, library: ctypes.CDLL, required: bool = False
) -> Bf16Weights | None:
    """Give ``hf_model``'s linear layers bf16 copies of their weights and biases, stepped by ``library``
    from ``optimizer``'s hooks (None where no linear parameter qualifies: an error when ``required``)."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # A parameter shared by several modules (tied weights) stays float32: its gradients from each use
    # are added in float32 there, and would be added in bf16 on a copy.
    uses = Counter(id(p) for _, p in hf_model.named_parameters(remove_duplicate=False))
    copies: list[Bf16Copy] = []
    for module in hf_model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight, bias = (
            Bf16Copy(p) if takes(p) and id(p) in in_optimizer and uses[id(p)] == 1 else None
            for p in (module.weight, module.bias)
        )
        if weight is None and bias is None:
            continue
        module.__dict__["bf16_copies"] = (weight, bias)
        if not isinstance(module, Bf16WeightsLinear):
            module.__class__ = mixed_class(Bf16WeightsLinear, type(module), "Bf16Weights")
        copies += [c for c in (weight, bias) if c is not None]
    if copies:
        return Bf16Weights(optimizer, copies, library)
    if required:
        raise EngineError(f"{SETTING}=true: no trainable float32 nn.Linear parameter in the optimizer")
    return None


class Bf16Weights:
    """Steps the masters of ``copies`` (parameters of ``optimizer``, a fused ``torch.optim.AdamW``) from
    their copies' bf16 gradients with the library, from the optimizer's own step hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer, copies: list[Bf16Copy], library: ctypes.CDLL) -> None:
        self.optimizer, self.copies, self.library = optimizer, copies, library
        self._pending: tuple[list[Bf16Copy], float] | None = None
        self._stale: list[Bf16Copy] = []
        self._cached: tuple[tuple, list[_Call]] | None = None  # see _calls
        optimizer.register_step_pre_hook(self._set_aside)
        optimizer.register_step_post_hook(self._step)
        zero_grad = optimizer.zero_grad

        def zero_grad_and_copies(set_to_none: bool = True) -> None:
            zero_grad(set_to_none=set_to_none)
            self.drop_gradients()

        optimizer.zero_grad = zero_grad_and_copies  # the copies' gradients go with the parameters'

    @property
    def parameters(self) -> int:
        return sum(c.master.numel() for c in self.copies)

    def norm(self) -> torch.Tensor | None:
        """The 2-norm of the copies' bf16 gradients together, summed in double (float32; None: no
        gradient), for the clipper: one pass of the library instead of a widening copy and a norm each."""
        grads = [c.tensor.grad for c in self.copies if c.tensor.grad is not None]
        if not grads:
            return None
        for grad in grads:
            if grad.dtype != torch.bfloat16 or not grad.is_contiguous():
                raise EngineError(
                    f"{SETTING}: a bf16 copy has a {grad.dtype} gradient that is not a contiguous bf16 one"
                )
        return torch.tensor(bf16_norm(self.library, grads, torch.get_num_threads()), dtype=torch.float32)

    def drop_gradients(self) -> None:
        for copy in self.copies:
            copy.tensor.grad = None

    def _set_aside(self, optimizer, args, kwargs) -> None:
        pending, self._stale = [], []
        for copy in self.copies:
            if copy.master.grad is not None:  # a float32 forward's gradient: the fused step takes it
                if copy.tensor.grad is not None:
                    raise EngineError(
                        f"{SETTING}: a parameter has both a float32 and a bf16 gradient this step "
                        "(float32 and bf16-autocast training forwards mixed in one step)"
                    )
                self._stale.append(copy)
            elif copy.tensor.grad is not None:
                pending.append(copy)
        scale = getattr(optimizer, "grad_scale", None)  # trainer.clip_in_step's, read before its hook drops it
        self._pending = (pending, float(scale) if scale is not None else 0.0)

    def _step(self, optimizer, args, kwargs) -> None:
        for copy in self._stale:  # the fused kernel wrote the master without a version bump
            copy.version = None
        self._stale = []
        if self._pending is None:
            return
        pending, scale = self._pending
        self._pending = None
        for call in self._calls(optimizer, pending):
            call.run(self.library, optimizer, scale)
        for copy in pending:
            copy.tensor.grad = None

    def _calls(self, optimizer: torch.optim.Optimizer, pending: list[Bf16Copy]) -> list[_Call]:
        """The library calls that step ``pending``: one per parameter group, made (checked, their
        pointer arrays built) once and kept while the same copies are pending under the same optimizer
        state and groups (``load_state_dict`` makes a new state: the calls are made again)."""
        copies, groups = tuple(map(id, pending)), tuple(map(id, optimizer.param_groups))
        if self._cached is not None:
            (cached_copies, cached_state, cached_groups), calls = self._cached
            if cached_copies == copies and cached_state is optimizer.state and cached_groups == groups:
                return calls
        group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        by_group: dict[int, list[Bf16Copy]] = {}
        for copy in pending:
            by_group.setdefault(group_of[id(copy.master)], []).append(copy)
        calls = [_Call(optimizer, index, copies) for index, copies in by_group.items()]
        self._cached = ((copies, optimizer.state, groups), calls)
        return calls


class _Call:
    """One library call: a parameter group's pending copies with their masters and moments (tensors
    that stay put from step to step), checked and their pointer arrays made once."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: int, copies: list[Bf16Copy]) -> None:
        self.group, self.copies = group, copies
        self.states = [fused_state(optimizer, copy.master, SETTING) for copy in copies]
        masters, tensors = [c.master for c in copies], [c.tensor for c in copies]
        avgs, sqs = [s["exp_avg"] for s in self.states], [s["exp_avg_sq"] for s in self.states]
        check_tensors(masters, (tensors, torch.bfloat16), (avgs, torch.float32), (sqs, torch.float32))
        self.tensors = (masters, tensors, avgs, sqs)
        self.pointers = [pointer_list(ts) for ts in self.tensors]
        self.sizes = size_list(masters)

    def run(self, library: ctypes.CDLL, optimizer: torch.optim.Optimizer, scale: float) -> None:
        """Count the step as the fused AdamW counts it (one foreach add, one read) and step the masters
        from the copies' gradients: in one library call where all counts agree, else one per count."""
        counts = [state["step"] for state in self.states]
        torch._foreach_add_(counts, 1)
        steps = torch.stack(counts).tolist()
        hyper = hyper_parameters(optimizer.param_groups[self.group])
        grads = [copy.tensor.grad for copy in self.copies]
        if all(step == steps[0] for step in steps):
            check_tensors(self.tensors[0], (grads, torch.bfloat16))
            masters, weights, avgs, sqs = self.pointers
            step_lists(library, (masters, weights, pointer_list(grads), avgs, sqs), self.sizes, hyper, steps[0], scale)
            return
        for step in sorted(set(steps)):  # parameters that missed steps count fewer
            chosen = [i for i, s in enumerate(steps) if s == step]
            masters, tensors, avgs, sqs = ([ts[i] for i in chosen] for ts in self.tensors)
            adamw_bf16(library, masters, tensors, [grads[i] for i in chosen], avgs, sqs, hyper, step, scale)


def check_tensors(params: list[torch.Tensor], *others: tuple[list[torch.Tensor], torch.dtype]) -> None:
    """Contiguous float32 ``params`` and, for each (tensors, dtype) of ``others``, contiguous ``dtype``
    tensors of the params' shapes: what the library's pointer arithmetic assumes."""
    for tensors, dtype in ((params, torch.float32), *others):
        for tensor, param in zip(tensors, params, strict=True):
            if tensor.dtype != dtype or tensor.shape != param.shape or not tensor.is_contiguous():
                raise EngineError(f"{SETTING}: a {tuple(tensor.shape)} {tensor.dtype} tensor where the step "
                                  f"needs a contiguous {dtype} one of {tuple(param.shape)}")  # fmt: skip


def pointer_list(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' data pointers as an int64 array, for the library's pointer-list arguments."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def size_list(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' element counts as an int64 array."""
    return torch.tensor([t.numel() for t in tensors], dtype=torch.int64)


def adamw_bf16(
    library: ctypes.CDLL,
    params: list[torch.Tensor],
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    avgs: list[torch.Tensor],
    sqs: list[torch.Tensor],
    hyper: tuple[float, float, float, float, float],
    step: float,
    scale: float,
) -> None:
    """One step of the library on contiguous CPU tensors: float32 ``params`` and moments, their bf16
    ``weights`` (written) and bf16 ``grads``; ``hyper``: lr, beta1, beta2, eps and weight decay
    (:func:`~engine.native_adamw.hyper_parameters`), ``step``: the count after this step, ``scale`` <= 0:
    no grad scale. The scalars derived as ATen's fused kernel derives them."""
    check_tensors(params, (weights, torch.bfloat16), (grads, torch.bfloat16))
    pointers = tuple(pointer_list(ts) for ts in (params, weights, grads, avgs, sqs))
    step_lists(library, pointers, size_list(params), hyper, step, scale)


def step_lists(
    library: ctypes.CDLL,
    pointers: tuple[torch.Tensor, ...],
    sizes: torch.Tensor,
    hyper: tuple[float, float, float, float, float],
    step: float,
    scale: float,
) -> None:
    """The library's step on checked tensors given as :func:`pointer_list` arrays of the masters, bf16
    weights, bf16 gradients and both moments, and their :func:`size_list`."""
    library.engine_adamw_bf16(
        len(sizes), *(p.data_ptr() for p in pointers), sizes.data_ptr(), *kernel_scalars(*hyper, step, scale)
    )


def bf16_norm(library: ctypes.CDLL, grads: list[torch.Tensor], threads: int) -> float:
    """The 2-norm of contiguous bf16 CPU tensors together, their squares summed in double."""
    pointers, sizes = pointer_list(grads), size_list(grads)
    return library.engine_bf16_norm(len(grads), pointers.data_ptr(), sizes.data_ptr(), threads)


def check(library: ctypes.CDLL, path: Path) -> None:
    """A build whose step differs from ATen's fused AdamW refuses to load: four steps of a 3 x 16 and
    a 48-element tensor with weight decay, and a grad scale in two of them, against
    ``torch._fused_adamw_`` itself on the gradients widened to float32 (no optimizer object: nothing
    that counts steps sees them); the bf16 copies must equal the new masters cast."""
    theirs = [torch.linspace(-1, 1, 48).reshape(3, 16), torch.linspace(2, -2, 48)]
    mine = [t.clone() for t in theirs]
    moments = [[torch.zeros_like(t) for t in theirs] for _ in range(4)]
    weights = [t.to(torch.bfloat16) for t in mine]
    for step in range(1, 5):
        grads = [(torch.sin(torch.arange(48.0) * step) / 7).to(torch.bfloat16).reshape(t.shape) for t in theirs]
        scale = 1.5 if step % 2 else 0.0
        torch._fused_adamw_(
            theirs, [g.float() for g in grads], moments[0], moments[1], [], [torch.tensor(float(step))] * 2,
            lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False,
            grad_scale=torch.tensor(scale) if scale else None,
        )  # fmt: skip
        adamw_bf16(library, mine, weights, grads, moments[2], moments[3], (1e-2, 0.9, 0.999, 1e-8, 0.1), step, scale)
    same = [
        torch.equal(a, b) for a, b in zip(theirs + moments[0] + moments[1], mine + moments[2] + moments[3], strict=True)
    ]
    if not all(same) or not all(torch.equal(p.to(torch.bfloat16), w) for p, w in zip(mine, weights, strict=True)):
        raise EngineError(f"{SETTING}: {path} does not step as torch's fused AdamW")
    grads = [w.reshape(-1) for w in weights] * 300  # 28800 elements: a share for each of two threads
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    if not math.isclose(bf16_norm(library, grads, 2), expected, rel_tol=1e-6):
        raise EngineError(f"{SETTING}: {path} does not compute the gradients' norm")
