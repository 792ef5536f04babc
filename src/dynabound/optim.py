"""AdaBound, AMSBound, AdaBoundW and AMSBoundW as ``torch.optim.Optimizer`` subclasses.

The classes validate hyperparameters, keep param groups and state, and dispatch to
:func:`dynabound.functional.adabound_step` with each group's hyperparameters as one
:class:`~dynabound.spec.StepSpec`; they hold no math.

``base_lr`` (the lr at which ``final_lr`` is meant) lives in each param group, so it
survives ``state_dict``/``load_state_dict``, ``deepcopy``, pickle and ``add_param_group``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import (
    Optimizer,
    ParamsT,
    _global_optimizer_post_hooks,
    _global_optimizer_pre_hooks,
    _use_grad_for_differentiable,
)
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import kernels, sharded_state
from . import state_formats as formats
from .bounds import BoundsSpec, validate_bounds
from .final_lr import AUTO, new_estimation
from .functional import (
    PendingSample,
    adabound_step,
    check_auto_final_lr,
    finish_estimating_step,
    start_estimating_step,
)
from .kernels.layout import dense_in_any_order
from .spec import StepSpec, StepTensors

__all__ = ["AdaBound", "AMSBound", "AdaBoundW", "AMSBoundW"]

_CUSTOM_BOUNDS = "custom"

# Keys added after the authors' release; __setstate__ backfills them on old checkpoints.
_BACKFILL: dict[str, Any] = {
    "amsbound": False,
    "decoupled_weight_decay": False,
    "unscaled_decay": False,
    "bounds": "reference",
    "box": None,
    "maximize": False,
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
    "state_dtype": None,
    "stochastic_rounding": False,
}


def _as_float(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _prepare_group(group: dict[str, Any], name: str) -> None:
    """Fill in the group's base_lr and box, then validate every hyperparameter."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{name}: Tensor lr must have exactly one element")
    if group["base_lr"] is None:
        group["base_lr"] = _as_float(lr)
    if group["box"] is not None:
        group["box"] = tuple(group["box"])
    final_lr = group["final_lr"]
    auto = isinstance(final_lr, str)
    if auto and final_lr != AUTO:
        raise ValueError(f"{name}: final_lr must be a number or 'auto', got {final_lr!r}")
    if auto:
        final_lr = 1.0  # the estimate's range is checked where it is made
        check_auto_final_lr(_spec_of(group), group["params"])
        group.setdefault("final_lr_auto", new_estimation())
    checks = [
        (_as_float(lr) >= 0, f"Invalid learning rate: {lr} (must be >= 0)"),
        (
            group["base_lr"] > 0,
            f"Invalid base_lr: {group['base_lr']} (must be > 0; it is the lr at which "
            "final_lr applies: pass base_lr explicitly when lr starts at 0)",
        ),
        (final_lr >= 0, f"Invalid final learning rate: {final_lr}"),
        # A bound function ignores final_lr; the built-in bounds are proportional to it.
        (
            final_lr != 0 or callable(group["bounds"]),
            f"Invalid final learning rate: {final_lr} (must be > 0: both bounds are "
            "proportional to it, so 0 clips every step's rate to 0 and no parameter ever moves)",
        ),
        (group["gamma"] > 0, f"Invalid gamma (convergence speed): {group['gamma']} (must be > 0)"),
        (group["eps"] >= 0, f"Invalid epsilon value: {group['eps']}"),
        (group["weight_decay"] >= 0, f"Invalid weight_decay value: {group['weight_decay']}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{name}: {message}")
    for index, beta in enumerate(group["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: Invalid beta parameter at index {index}: {beta}")
    validate_bounds(group["bounds"])
    box = group["box"]
    if box is not None and not (len(box) == 2 and box[0] < box[1]):
        raise ValueError(f"{name}: box must be a pair (low, high) with low < high, got {box}")
    if group["fused"] and group["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group["fused"] and group["differentiable"]:
        raise RuntimeError("`fused` does not support `differentiable`")
    formats.check_state_dtype(group["state_dtype"])
    encoded = group["state_dtype"] is not None or group["stochastic_rounding"]
    if encoded and (group["differentiable"] or group["capturable"]):
        raise ValueError(
            f"{name}: state_dtype and stochastic_rounding do not support differentiable or "
            "capturable (the random bits are drawn from the step's value on the host)"
        )
    for p in group["params"]:
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(
                f"{name} can only optimize floating-point or complex parameters, got {p.dtype}"
            )
        if group["fused"] and p.device.type not in kernels.DEVICE_TYPES:
            raise RuntimeError(
                f"{name}(fused=True) supports parameters on {' and '.join(kernels.DEVICE_TYPES)}"
                f" devices, got one on {p.device}; use fused=False"
            )
        if group["state_dtype"] is not None:
            if p.dtype.to_real() not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(
                    f"{name}: state_dtype={group['state_dtype']!r} needs float32, bfloat16 or "
                    f"float16 parameters (complex64 too), got {p.dtype}"
                )
            if not dense_in_any_order(p):
                raise ValueError(
                    f"{name}: state_dtype={group['state_dtype']!r} needs parameters stored "
                    "without gaps (contiguous, channels-last or another dense layout)"
                )
            if is_traceable_wrapper_subclass(p) and not sharded_state.is_sharded(p):
                raise ValueError(
                    f"{name}: state_dtype={group['state_dtype']!r} is not supported for "
                    f"{type(p).__name__} parameters (of tensor subclasses, DTensor only)"
                )


class AdaBound(Optimizer):
    """AdaBound / AMSBound (Luo et al., ICLR 2019): Adam with per-element rates clipped to
    ``[lower(t), upper(t)]``, two bounds that converge to ``final_lr``.

    With the defaults the update matches the authors' AdaBound 0.0.5:

    .. code-block:: text

        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2 ;  u = max(u, v) if amsbound else v
        rate = clamp(lr*sqrt(1-b2^t)/(1-b1^t) / (sqrt(u)+eps), lower, upper)
        lower = final*(1 - 1/(gamma*t+1)),  upper = final*(1 + 1/(gamma*t)),
        final = final_lr * lr / base_lr ;   p -= rate * m

    When ``gamma*t`` is large the bounds meet and the step becomes momentum SGD,
    ``torch.optim.SGD(lr=final*(1-b1), momentum=b1)``; with ``gamma=1e-3`` the band is within
    2x of ``final`` after about 1000 steps (steps, not epochs, set the pace).

    Args:
        params: iterable of parameters or param-group dicts.
        lr: Adam-phase learning rate (float or 1-element Tensor). A scheduler scaling it
            scales the bounds too. ``lr == 0`` (warm-up) means no update.
        betas: coefficients of the running averages of the gradient and its square.
        final_lr: the SGD learning rate both bounds converge to, meant at ``lr == base_lr``;
            ``"auto"`` estimates it per param group from the Adam phase's own steps
            (:mod:`dynabound.final_lr`): the running estimate bounds the steps until it
            settles, then ``group["final_lr"]`` holds the fixed float and
            ``group["final_lr_auto"]`` the record of how it was found. On a GPU a step
            leaves its sample on the device until the next step (so it never waits for
            the device): :meth:`update_final_lr_estimates` brings the records up to date
            at once, and ``state_dict()`` calls it.
        gamma: convergence speed of the bounds (> 0).
        eps: term added to the denominator.
        weight_decay: L2 penalty added to the gradient (decoupled with
            ``decoupled_weight_decay``).
        amsbound: use the running maximum of the second moment (AMSBound).
        decoupled_weight_decay: decay the parameter before the update instead of adding
            an L2 term to the gradient: ``p *= 1 - lr*weight_decay`` (AdamW-style).
        unscaled_decay: with decoupled decay, use the authors' unreleased AdaBoundW
            convention ``p -= weight_decay * p`` (not scaled by lr).
        bounds: ``"reference"`` (the authors' code), ``"paper"`` (Algorithm 2 of the paper:
            no bias correction, no eps, bounds ``final -/+ final/((1-b2)t (+1))``, rate
            divided by ``sqrt(t)``), or a callable ``f(step) -> (lower, upper)`` giving the
            rate bounds at ``lr == base_lr``.
        box: optional ``(low, high)``: project parameters onto this box after each step.
        base_lr: the lr that ``final_lr`` refers to; defaults to each group's lr when the
            group is added. Kept in the param group and saved with ``state_dict``.
        state_dtype: how the moments are stored: ``None`` (the parameter's dtype),
            ``torch.bfloat16`` (2 bytes each) or ``"8bit"`` (1 byte plus a float32 scale per
            256 elements); arithmetic stays float32, and encoded moments are rounded
            stochastically (see :mod:`dynabound.state_formats`). ``load_state_dict``
            converts a state saved in another format. DTensor (FSDP2) parameters: each
            rank encodes its own shard (:mod:`dynabound.sharded_state`).
        stochastic_rounding: round bfloat16 parameters stochastically after each update
            (pure-bfloat16 training: small updates survive in expectation instead of being
            rounded away). Other dtypes are unaffected.
        foreach, fused, maximize, capturable, differentiable: as in ``torch.optim.Adam``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float | str = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        unscaled_decay: bool = False,
        bounds: BoundsSpec = "reference",
        box: tuple[float, float] | None = None,
        base_lr: float | None = None,
        state_dtype: torch.dtype | str | None = None,
        stochastic_rounding: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            final_lr=final_lr,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            amsbound=amsbound,
            decoupled_weight_decay=decoupled_weight_decay,
            unscaled_decay=unscaled_decay,
            bounds=bounds,
            box=tuple(box) if box is not None else None,
            base_lr=base_lr,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            foreach=foreach,
            fused=fused,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
        )
        # Estimating steps whose samples are still on the device: (group, record, sample).
        self._pending_samples: list[tuple[dict, dict, PendingSample]] = []
        super().__init__(params, defaults)
        if fused:
            self._step_supports_amp_scaling = True
        self._register_state_dict_hook()

    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch's wrapper of ``step`` (the step hooks and a profiler label), without the
        label while torch.compile traces the step: dynamo drops ``record_function`` and
        warns that it does on every compiled run."""
        profiled = Optimizer.profile_hook_step(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return _step_with_hooks(func, args, kwargs)
            return profiled(*args, **kwargs)

        return wrapper

    def _register_state_dict_hook(self) -> None:
        # Registered first, so user state_dict post-hooks already see the marker. torch
        # drops hooks on pickle and deepcopy; __setstate__ puts this one back.
        hooks = self._optimizer_state_dict_post_hooks.values()
        if _present_state_dict not in hooks:
            self.register_state_dict_post_hook(_present_state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _prepare_group(self.param_groups[-1], type(self).__name__)
        except (ValueError, RuntimeError):
            self.param_groups.pop()  # a rejected group must not stay installed
            raise
        self._note_estimation()

    def update_final_lr_estimates(self) -> None:
        """Add the samples of the last estimating steps that are still on the device to
        their groups' ``final_lr`` estimates (waiting for those steps to finish), and put
        an estimate that is now fixed in ``group["final_lr"]``.

        A step on a GPU leaves its sample there until the next step, ``state_dict()`` or
        this call, so it never waits for the device; on the CPU each step adds its own.
        The estimates are the same either way: every step uses the estimate of all the
        steps before it."""
        if not self._pending_samples:
            return
        pending, self._pending_samples = self._pending_samples, []
        for group, record, sample in pending:
            self._add_sample(group, record, sample)

    @staticmethod
    def _add_sample(group: dict[str, Any], record: dict, sample: PendingSample) -> None:
        fixed = finish_estimating_step(record, sample)
        # A group set to a number (or to "auto" again, a new record) since keeps it.
        if fixed is not None and group["final_lr"] == AUTO and group.get("final_lr_auto") is record:
            group["final_lr"] = fixed

    def state_dict(self) -> dict[str, Any]:
        self.update_final_lr_estimates()
        return super().state_dict()

    def __getstate__(self) -> dict[str, Any]:
        self.update_final_lr_estimates()
        return super().__getstate__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pending_samples = []
        self._register_state_dict_hook()
        self._note_estimation()
        for group in self.param_groups:
            for key, value in _BACKFILL.items():
                group.setdefault(key, value)
            if group.get("base_lr") is None:
                group["base_lr"] = _as_float(group.get("initial_lr", group["lr"]))
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]), dtype=torch.float32, device=_step_device(group, p)
                    )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.update_final_lr_estimates()  # the groups it replaces are then complete
        _check_state_dict(state_dict, self.param_groups, type(self).__name__)
        state_dict = dict(state_dict)
        saved_groups = [dict(g) for g in state_dict["param_groups"]]
        guessed = False
        for saved, current in zip(saved_groups, self.param_groups, strict=False):
            _check_codes_arrived_with_scales(state_dict["state"], saved, type(self).__name__)
            # How the moments are stored belongs to the receiving optimizer: a state saved
            # in another format is converted (_restore_encoded_state).
            saved["state_dtype"] = current["state_dtype"]
            saved["stochastic_rounding"] = current["stochastic_rounding"]
            if saved.get("bounds") == _CUSTOM_BOUNDS:
                if not callable(current["bounds"]):
                    raise ValueError(
                        "this state_dict was saved with a bound function; build the "
                        "receiving optimizer with the same bounds=callable before loading"
                    )
                saved["bounds"] = current["bounds"]
            if saved.get("base_lr") is None:
                # The authors' package kept base_lr off the state dict. A scheduler's
                # initial_lr is the lr at construction, which is what it used.
                if "initial_lr" in saved:
                    saved["base_lr"] = _as_float(saved["initial_lr"])
                else:
                    saved["base_lr"] = current["base_lr"]
                    guessed = True
        if guessed:
            warnings.warn(
                "loading a state_dict without base_lr (saved by the authors' adabound "
                "package?): using the receiving optimizer's base_lr. If that optimizer was "
                "built with a decayed lr, pass base_lr= explicitly.",
                UserWarning,
                stacklevel=2,
            )
        state_dict["param_groups"] = saved_groups
        super().load_state_dict(state_dict)
        self._note_estimation()
        self._restore_encoded_state(state_dict)
        # torch keeps loaded step counters on the CPU unless fused=True or capturable; the
        # default fused CUDA path wants them beside the parameters too.
        for group in self.param_groups:
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if torch.is_tensor(step) and step.device != (device := _step_device(group, p)):
                    self.state[p]["step"] = step.to(device)

    def _restore_encoded_state(self, state_dict: dict[str, Any]) -> None:
        """Undo torch's cast of every floating-point state tensor to its parameter's dtype
        for the moments (codes, scales and bfloat16 moments are stored as they are), then
        convert each parameter's moments to its group's state_dtype."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        groups = [(g, p) for g in self.param_groups for p in g["params"]]
        keys = {*formats.MOMENTS, *map(formats.scale_key, formats.MOMENTS)}
        for saved_id, (group, p) in zip(saved_ids, groups, strict=False):
            saved = state_dict["state"].get(saved_id)
            state = self.state.get(p)
            if not saved or not state:
                continue
            for key in keys & saved.keys():
                value = saved[key]
                if torch.is_tensor(value) and value.dtype != state[key].dtype:
                    state[key] = value.to(device=p.device)
            if formats.stored_format(state, p) != formats.storage(group["state_dtype"], p):
                sharded_state.convert(state, p, group["state_dtype"])

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[formats.Moment],
        exp_avg_sqs: list[formats.Moment],
        max_exp_avg_sqs: list[formats.Moment],
        state_steps: list[Tensor],
        rounding_seeds: list[int] | None = None,
        seed_base: int = 0,
    ) -> bool:
        # Runs every step over every parameter: group lookups hoisted, p.grad read once.
        has_complex = False
        amsbound, differentiable = group["amsbound"], group["differentiable"]
        state_dtype = group["state_dtype"]
        # What exp_avg's dtype is when the moments are stored as state_dtype says (None:
        # the parameter's own): one comparison per step notices a changed state_dtype.
        stored_dtype = formats.moment_dtype(state_dtype)
        all_state = self.state
        for position, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    "use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            has_complex |= p.is_complex()
            params.append(p)
            grads.append(grad)
            state = all_state[p]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32, device=_step_device(group, p))
                for moment in formats.MOMENTS if amsbound else formats.MOMENTS[:2]:
                    state.update(sharded_state.new_moment(p, moment, state_dtype))
            elif state["exp_avg"].dtype is not (stored_dtype or p.dtype):
                # The group's state_dtype was changed after the state was created (or the
                # parameter's dtype, which keeps the moments as they are).
                if formats.stored_format(state, p) != formats.storage(state_dtype, p):
                    sharded_state.convert(state, p, state_dtype)
            step = state["step"]
            if differentiable and step.requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            if amsbound and "max_exp_avg_sq" not in state:
                # amsbound switched on after training began
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
                if formats.scale_key("exp_avg_sq") in state:
                    state["max_exp_avg_sq_scale"] = state["exp_avg_sq_scale"].clone()
            if state_dtype == formats.EIGHT_BIT:
                exp_avgs.append(formats.Quantized(state["exp_avg"], state["exp_avg_scale"]))
                exp_avg_sqs.append(
                    formats.Quantized(state["exp_avg_sq"], state["exp_avg_sq_scale"])
                )
                if amsbound:
                    max_exp_avg_sqs.append(
                        formats.Quantized(state["max_exp_avg_sq"], state["max_exp_avg_sq_scale"])
                    )
            else:
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if amsbound:
                    max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(step)
            if rounding_seeds is not None:
                rounding_seeds.append(sharded_state.shard_seed(seed_base + position, p))
        return has_complex

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        health_check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", None
        )
        if health_check is not None:
            health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # An estimating step reads its projection on the host and grows its record: it runs
        # eagerly, between graphs, until every estimate is fixed and its last sample read.
        # The flag is an attribute: dynamo would guard on every entry of a group it reads,
        # the growing record too.
        if torch.compiler.is_compiling() and self._estimating_final_lr:
            from ._compile_support import call_eagerly

            call_eagerly(AdaBound._step_groups, self)
        else:
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        """Step every param group (``step`` without its closure and hooks)."""
        self.update_final_lr_estimates()
        for group_index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[formats.Moment] = []
            exp_avg_sqs: list[formats.Moment] = []
            max_exp_avg_sqs: list[formats.Moment] = []
            state_steps: list[Tensor] = []
            encoded = group["state_dtype"] is not None or group["stochastic_rounding"]
            # A parameter's random bits are seeded by its place in the optimizer, which
            # state_dict keeps, so a resumed run draws the same bits.
            rounding_seeds: list[int] | None = [] if encoded else None
            has_complex = self._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                rounding_seeds, group_index << 24,
            )  # fmt: skip
            if not params:
                continue
            foreach, fused = _choose_implementation(group, params)
            spec = _spec_of(
                group,
                lr=_lr_for_step(group),
                # Step counters on a GPU (kept there for the default fused path) are read
                # as tensors on a fallback path too: reading them from the host would sync.
                capturable=group["capturable"] or not (fused or state_steps[0].is_cpu),
                has_complex=has_complex,
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
            )
            tensors = StepTensors(
                params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, rounding_seeds
            )
            if group["final_lr"] == AUTO:
                record = group.get("final_lr_auto")
                if record is None or record["fixed_at"] is not None:
                    record = group["final_lr_auto"] = new_estimation()  # set to "auto" again
                sample = start_estimating_step(tensors, spec, record, foreach=foreach, fused=fused)
                if _read_at_once(sample):
                    self._add_sample(group, record, sample)
                else:
                    self._pending_samples.append((group, record, sample))
            else:
                adabound_step(tensors, spec, foreach=foreach, fused=fused)
        self._note_estimation()

    def _note_estimation(self) -> None:
        self._estimating_final_lr = bool(self._pending_samples) or any(
            g["final_lr"] == AUTO for g in self.param_groups
        )


def _read_at_once(sample: PendingSample) -> bool:
    """Whether a step adds its sample itself: when the sample is on the host already."""
    return sample.copied is None


# The StepSpec fields a param group holds under their own names: every keyword of the
# constructor that is one, but for those step() derives (lr, capturable).
_GROUP_FIELDS = tuple(
    name
    for name in StepSpec._fields
    if name in inspect.signature(AdaBound.__init__).parameters and name not in ("lr", "capturable")
)


def _spec_of(group: dict[str, Any], **derived: Any) -> StepSpec:
    """The group's StepSpec; ``derived`` gives the fields step() derives (defaults: the
    group's lr and capturable)."""
    beta1, beta2 = group["betas"]
    derived.setdefault("lr", group["lr"])
    derived.setdefault("capturable", group["capturable"])
    return StepSpec(
        **{name: group[name] for name in _GROUP_FIELDS}, beta1=beta1, beta2=beta2, **derived
    )


def _kernel_ready(device_type: str) -> bool:
    if torch.compiler.is_compiling():
        from ._compile_support import kernel_ready

        return kernel_ready(device_type)
    return kernels.default_kernel_ready(device_type)


def _check_state_dict(state_dict: Any, groups: list[dict[str, Any]], name: str) -> None:
    """Refuse a state dict that is not an optimizer's, or whose moments do not fit the
    parameters they would be loaded into, before anything is loaded: the step after it
    would fail far from the cause, or broadcast a moment of the wrong shape."""
    where = f"{name}.load_state_dict"
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        if isinstance(state_dict, dict):
            keys = ", ".join(map(repr, list(state_dict)[:8]))
            got = f"a dict with keys {keys or '(none)'}"
        else:
            got = f"a {type(state_dict).__name__}"
        raise ValueError(
            f"{where}: expected an optimizer state dict (with 'state' and 'param_groups', as "
            f"optimizer.state_dict() returns), got {got}; from a training checkpoint, pass its "
            "optimizer entry"
        )
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, list | tuple) or not all(
        isinstance(g, dict) and "params" in g for g in saved_groups
    ):
        raise ValueError(f"{where}: 'param_groups' must be a list of dicts with 'params'")
    if not isinstance(state_dict["state"], dict):
        raise ValueError(f"{where}: 'state' must be a dict, got {type(state_dict['state'])}")
    saved_ids = [i for g in saved_groups for i in g["params"]]
    params = [p for g in groups for p in g["params"]]
    for index, (saved_id, p) in enumerate(zip(saved_ids, params, strict=False)):
        saved = state_dict["state"].get(saved_id)
        if not saved:
            continue
        missing = [k for k in ("step", *formats.MOMENTS[:2]) if k not in saved]
        if missing:
            raise ValueError(
                f"{where}: the state of parameter {index} lacks {', '.join(missing)}; "
                "it was not saved by AdaBound or Adam"
            )
        # The parameter's shape, or its real view's for complex moments stored as reals.
        shapes = {tuple(p.shape), (*p.shape, 2) if p.is_complex() else tuple(p.shape)}
        for key in formats.MOMENTS:
            value = saved.get(key)
            if torch.is_tensor(value) and tuple(value.shape) not in shapes:
                raise ValueError(
                    f"{where}: {key} of parameter {index} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(p.shape)}: the state dict belongs to another model, or "
                    "to the same parameters in another order"
                )


def _step_with_hooks(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """What torch's ``Optimizer.profile_hook_step`` wrapper does around ``step``, less the
    profiler label: the global and the optimizer's pre-hooks (which may replace the
    arguments), the step, and the post-hooks."""
    self = args[0]
    for pre_hook in (
        *_global_optimizer_pre_hooks.values(),
        *self._optimizer_step_pre_hooks.values(),
    ):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(
                    f"{func} must return None or a tuple of (new_args, new_kwargs), but got "
                    f"{result}."
                )
            args, kwargs = result
    out = func(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in (
        *self._optimizer_step_post_hooks.values(),
        *_global_optimizer_post_hooks.values(),
    ):
        post_hook(self, args, kwargs)
    return out


def _lr_for_step(group: dict[str, Any]) -> float | Tensor:
    """The group's lr; under torch.compile a float lr becomes a tensor (no recompilation
    when a scheduler changes it). The type is asked with torch.is_tensor: dynamo answers
    isinstance on a float by guarding on its value, which recompiled once at the first
    new lr."""
    if torch.compiler.is_compiling() and not torch.is_tensor(group["lr"]):
        from ._compile_support import lr_as_tensor

        return lr_as_tensor(group)
    return group["lr"]


def _mark_bound_functions(state_dict: dict[str, Any]) -> None:
    """A bound function is code, not data: the state dict holds a marker instead, so that
    ``torch.load(weights_only=True)`` works; load_state_dict takes the function from the
    receiving optimizer."""
    for group in state_dict["param_groups"]:
        if callable(group.get("bounds")):
            group["bounds"] = _CUSTOM_BOUNDS


def _present_state_dict(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """What ``state_dict`` holds beyond torch's: a marker for a bound function, and 8-bit
    moments of DTensor parameters as float32 DTensors, which a distributed checkpoint can
    reshard (:func:`dynabound.sharded_state.portable_state`). A group whose moments are all
    presented so says ``state_dtype`` None, the format of what it holds: a group saying
    "8bit" holds codes and block scales."""
    _mark_bound_functions(state_dict)
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        for saved_id, p in zip(saved["params"], group["params"], strict=True):
            if saved_id in state_dict["state"]:
                state_dict["state"][saved_id] = sharded_state.portable_state(
                    state_dict["state"][saved_id], p
                )
        if group["state_dtype"] == formats.EIGHT_BIT and all(
            sharded_state.is_sharded(p) for p in group["params"]
        ):
            saved["state_dtype"] = None


def _check_codes_arrived_with_scales(state: dict, saved_group: dict, name: str) -> None:
    """Refuse 8-bit codes that lost their block scales on the way: a distributed
    checkpoint copies saved tensors into the receiving optimizer's own ``state_dict``, so
    codes saved from unsharded parameters arrive cast into the float moments of a receiver
    in another format or with DTensor parameters, without their scales."""
    if saved_group.get("state_dtype") != formats.EIGHT_BIT:
        return
    for saved_id in saved_group["params"]:
        entry = state.get(saved_id) or {}
        if "exp_avg" in entry and formats.scale_key("exp_avg") not in entry:
            raise ValueError(
                f"{name}.load_state_dict: the state was saved with state_dtype='8bit' (codes "
                "and block scales of unsharded parameters) but arrived without its block "
                "scales: torch.distributed.checkpoint cannot convert 8-bit codes into another "
                "state_dtype or onto DTensor parameters. Load it into the same unsharded "
                "model with state_dtype='8bit', or save it from a sharded model (FSDP2, a "
                "one-rank mesh will do), whose checkpoints hold decoded moments"
            )


def _step_device(group: dict[str, Any], p: Tensor) -> torch.device:
    """Where a parameter's step counter lives: beside it whenever a fused CUDA step or a
    captured graph may read it (reading it from the host would sync), else on the CPU."""
    if group["capturable"] or group["fused"]:
        return p.device
    if p.is_cuda and _fused_by_default(group) and kernels.is_available(p.device):
        return p.device
    return torch.device("cpu")


def _fused_by_default(group: dict[str, Any]) -> bool:
    return group["fused"] is None and group["foreach"] is None and not group["differentiable"]


def _choose_implementation(group: dict[str, Any], params: list[Tensor]) -> tuple[bool, bool]:
    """(foreach, fused) for this step: explicit choices win; None picks the fastest safe path.

    With no choice made, the fused kernel runs wherever it can: on CPU (the C++ kernel, built
    on first use) and on CUDA (the Triton kernel), for groups whose parameters it can walk
    (floating-point or complex, dense layouts). It costs what torch's fused Adam costs.
    Otherwise foreach, which unlike torch.optim is also the CPU default: it runs about 3x
    faster than the single-tensor loop (benchmarks/step_time.py). When the kernel is
    unavailable (no compiler or ninja on CPU, no Triton on CUDA) a warning says why, once.
    """
    fused, foreach = group["fused"], group["foreach"]
    if fused:
        return False, True  # the kernels raise a clear RuntimeError when unavailable
    if foreach is not None:
        return bool(foreach), False
    if group["differentiable"] or torch.jit.is_scripting():
        return False, False
    if fused is None and _kernel_ready(params[0].device.type) and kernels.can_fuse(params):
        return False, True
    # torch.optim's list, which torch.distributed extends with DTensor.
    supported = _torch_optimizer._foreach_supported_types
    return all(type(p) in supported for p in params), False


class AMSBound(AdaBound):
    """AMSBound: :class:`AdaBound` with ``amsbound=True`` (running max of the second moment)."""

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, *args: Any, **kwargs: Any):
        kwargs.setdefault("amsbound", True)
        super().__init__(params, lr, *args, **kwargs)


class AdaBoundW(AdaBound):
    """AdaBound with decoupled weight decay: ``p *= 1 - lr*weight_decay`` before the update.

    ``unscaled_decay=True`` gives the authors' unreleased convention ``p -= weight_decay*p``.
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, *args: Any, **kwargs: Any):
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr, *args, **kwargs)


class AMSBoundW(AdaBoundW):
    """AMSBound with decoupled weight decay (see :class:`AdaBoundW`)."""

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, *args: Any, **kwargs: Any):
        kwargs.setdefault("amsbound", True)
        super().__init__(params, lr, *args, **kwargs)
