"""Per-element effective learning rates and bound activity, read from an optimizer's state.

The *effective rate* of an element is the factor that multiplies its update direction in
the step the optimizer last took (the direction is the first moment ``m`` for Adam-family
optimizers, the gradient for RMSprop and Adagrad). It is rebuilt from the state as it is
after that step, using the state's step count ``t`` as stored; nothing is modified.

Formulas (``u`` is the second-moment buffer, ``t`` the per-parameter step):

* dynabound (``AdaBound``, ``AMSBound``, ``AdaBoundW``, ``AMSBoundW``), scalars from
  :func:`dynabound.bounds.step_coefficients`:
  ``rate = lr * scale * clamp(numerator / (sqrt(u) + eps), lower, upper)``, ``p -= rate*m``;
  ``u = max_exp_avg_sq`` with amsbound; no ``eps`` in ``bounds="paper"`` mode.
* ``torch.optim.Adam`` / ``AdamW`` (``amsgrad`` uses ``max_exp_avg_sq`` as ``u``):
  ``rate = lr/(1-b1^t) / (sqrt(u)/sqrt(1-b2^t) + eps)``, ``p -= rate*m``.
* ``torch.optim.Adamax``: ``rate = lr/(1-b1^t) / exp_inf``, ``p -= rate*m``.
* ``torch.optim.RMSprop``: ``rate = lr / (sqrt(square_avg) + eps)``, or with
  ``centered=True`` ``lr / (sqrt(square_avg - grad_avg^2) + eps)``. Without momentum
  ``p -= rate*g``; with momentum the rate scales the gradient entering the buffer,
  ``buf = momentum*buf + (rate/lr)*g; p -= lr*buf``.
* ``torch.optim.Adagrad``: ``rate = clr / (sqrt(sum) + eps)`` with
  ``clr = lr / (1 + (t-1)*lr_decay)``, ``p -= rate*g``.
* ``torch.optim.SGD``: ``rate = lr`` everywhere (multiplies the momentum buffer, or the
  gradient without momentum).

Complex parameters are treated as pairs of real coordinates, as the optimizers do: their
rates have shape ``(*p.shape, 2)`` (``torch.view_as_real`` layout).

Elements whose second moment is still exactly zero (no nonzero gradient so far: the weights
of a dead hidden unit, of an input pixel that is blank in every image) get the largest rate
there is, ``lr/eps`` for Adam (the bound for AdaBound), from eps, not from any gradient.
``effective_lr(..., exclude_zero_second_moment=True)`` leaves them out (as NaN) and counts
them, so that a figure of the rates shows the optimizer's dynamics, not this artifact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import SGD, Adagrad, Adam, Adamax, AdamW, Optimizer, RMSprop

from .. import state_formats as formats
from ..bounds import no_bounds, step_coefficients
from ..final_lr import AUTO, final_lr_at
from ..optim import AdaBound

__all__ = [
    "BoundActivity",
    "EffectiveRates",
    "ParamActivity",
    "SUPPORTED_OPTIMIZERS",
    "bound_activity",
    "effective_lr",
    "rate_statistics",
]

# AdamW by name: torch 2.4 to 2.6 at least define it apart from Adam, not as a subclass.
SUPPORTED_OPTIMIZERS: tuple[type[Optimizer], ...] = (
    AdaBound, Adam, AdamW, Adamax, RMSprop, Adagrad, SGD,
)  # fmt: skip

# Above this many elements, quantiles come from a fixed-seed uniform sample: an exact sort of
# a 21M-element ResNet-34 takes seconds on a small CPU, while the sample's rank error stays
# below 1e-3.
EXACT_QUANTILE_LIMIT = 1 << 18

Names = nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] | None


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _step(state: Mapping[str, Any]) -> float:
    return _float(state.get("step", 0))


def check_supported(optimizer: Optimizer) -> None:
    """Raise ``TypeError`` unless :func:`effective_lr` knows ``optimizer``'s update rule."""
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_OPTIMIZERS)
        raise TypeError(
            f"effective learning rates are not defined for {type(optimizer).__name__}: "
            f"supported optimizers are dynabound's and torch.optim's {names} (and subclasses)"
        )


@dataclass(frozen=True)
class _DynaboundRate:
    """One parameter's rate with the pieces needed to tell which elements are clipped."""

    rate: Tensor
    raw: Tensor  # numerator / denominator, before clipping, relative to lr
    lower: float  # bounds relative to lr, before lr * scale
    upper: float
    absolute: float  # lr * scale: converts relative values into rates
    step: float


def _dynabound_rate(group: Mapping[str, Any], state: Mapping[str, Any]) -> _DynaboundRate:
    beta1, beta2 = group["betas"]
    step = _step(state)
    final_lr = final_lr_at(group, int(step))
    bounds: Any = group["bounds"] if final_lr is not None else no_bounds
    c = step_coefficients(
        step,
        bounds=bounds,
        final_lr=final_lr if final_lr is not None else 1.0,
        base_lr=group["base_lr"],
        gamma=group["gamma"],
        beta1=_float(beta1),
        beta2=_float(beta2),
    )
    # Same operations as dynabound.functional (in place to spare memory), so rounding
    # matches the step's; moments stored in fewer bits are read as the step reads them.
    raw = _dynabound_moment(group, state).sqrt()
    if c.eps_used:
        raw.add_(group["eps"])
    raw.reciprocal_().mul_(c.numerator)
    lower, upper = _float(c.lower), _float(c.upper)
    absolute = _float(group["lr"]) * _float(c.scale)
    rate = raw.clamp(lower, upper).mul_(absolute)
    return _DynaboundRate(rate, raw, lower, upper, absolute, step)


def _dynabound_moment(group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor:
    """The second moment the rate uses, in float32 or wider, read as the step reads it (also
    from bfloat16 or 8-bit storage); the state's own tensor where it is stored as such."""
    # A group switched to amsbound after its last step has no running max yet; the next
    # step starts it from exp_avg_sq, which is also what the last step used.
    moment = "exp_avg_sq"
    if group["amsbound"] and "max_exp_avg_sq" in state:
        moment = "max_exp_avg_sq"
    u = state[moment]
    if formats.scale_key(moment) in state or u.dtype in (torch.bfloat16, torch.float16):
        return formats.moment_float32(state, moment)
    return _real(u)


def _second_moment(
    optimizer: Optimizer, group: Mapping[str, Any], state: Mapping[str, Any]
) -> Tensor | None:
    """The accumulated squared gradients the rate divides by (None for SGD, which has none);
    an element where it is exactly zero has had no nonzero gradient yet."""
    if isinstance(optimizer, AdaBound):
        return _dynabound_moment(group, state)
    if isinstance(optimizer, Adam | AdamW):  # AdamW subclasses Adam only from torch 2.5 on
        return _real(state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"])
    if isinstance(optimizer, Adamax):  # max(b2*u, |g| + eps) holds eps until a gradient
        return _real(state["exp_inf"]) - group["eps"]
    if isinstance(optimizer, RMSprop):
        return _real(state["square_avg"])
    if isinstance(optimizer, Adagrad):
        return _real(state["sum"])
    return None


def _torch_rate(optimizer: Optimizer, group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor:
    lr = _float(group["lr"])
    t = _step(state)
    if isinstance(optimizer, Adam | AdamW):
        beta1, beta2 = (_float(b) for b in group["betas"])
        u = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        denom = (_real(u).sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        return denom.reciprocal_().mul_(lr / (1 - beta1**t))
    if isinstance(optimizer, Adamax):
        beta1 = _float(group["betas"][0])
        return _real(state["exp_inf"]).reciprocal().mul_(lr / (1 - beta1**t))
    if isinstance(optimizer, RMSprop):
        square_avg = _real(state["square_avg"])
        if group["centered"]:
            grad_avg = _real(state["grad_avg"])
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        return avg.add_(group["eps"]).reciprocal_().mul_(lr)
    if isinstance(optimizer, Adagrad):
        clr = lr / (1 + (t - 1) * group["lr_decay"])
        return _real(state["sum"]).sqrt().add_(group["eps"]).reciprocal_().mul_(clr)
    raise AssertionError(f"unhandled optimizer {type(optimizer).__name__}")  # pragma: no cover


def _stepped(optimizer: Optimizer) -> Iterable[tuple[dict[str, Any], Tensor, dict[str, Any]]]:
    """(group, param, state) for every parameter that has taken at least one step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and _step(state) >= 1:
                yield group, p, state


class EffectiveRates(dict[Tensor, Tensor]):
    """``{param: rate}`` as returned by :func:`effective_lr`, with ``excluded``, the number
    of elements it left out (NaN in their rate) because their second moment is still exactly
    zero, and ``numel``, the number of elements of all the rates."""

    def __init__(
        self,
        rates: Mapping[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]] = (),
        excluded: int = 0,
    ) -> None:
        super().__init__(rates)
        self.excluded = excluded

    @property
    def numel(self) -> int:
        return sum(r.numel() for r in self.values())


def effective_lr(
    optimizer: Optimizer, *, exclude_zero_second_moment: bool = False
) -> EffectiveRates:
    """Per-element effective rate of each parameter at the optimizer's current state.

    Returns ``{param: rate}`` for the parameters that have taken a step (for SGD without
    momentum, which keeps no state: the parameters that have a gradient). ``rate`` has the
    parameter's shape (``(*shape, 2)`` for complex parameters) and is the factor that the
    last step applied to the update direction; see the module docstring for each formula.
    Raises ``TypeError`` for optimizers whose update has no such per-element rate.

    ``exclude_zero_second_moment=True`` sets the rate of every element whose second moment
    (Adam's ``exp_avg_sq``, or the running maximum with amsgrad/amsbound; RMSprop's
    ``square_avg``, Adagrad's ``sum``; Adamax's ``exp_inf`` less its eps) is still exactly
    zero to NaN,
    and counts those elements in the result's ``excluded``: their rate comes from eps (or
    the upper bound), because they have never had a nonzero gradient. SGD has no second
    moment and excludes nothing.
    """
    check_supported(optimizer)
    rates = EffectiveRates()
    if isinstance(optimizer, SGD):
        for group in optimizer.param_groups:
            lr = _float(group["lr"])
            for p in group["params"]:
                if optimizer.state.get(p) or (group["momentum"] == 0 and p.grad is not None):
                    rates[p] = torch.full_like(_real(p.detach()), lr)
        return rates
    with torch.no_grad():
        for group, p, state in _stepped(optimizer):
            if isinstance(optimizer, AdaBound):
                rate = _dynabound_rate(group, state).rate
            else:
                rate = _torch_rate(optimizer, group, state)
            if exclude_zero_second_moment:
                moment = _second_moment(optimizer, group, state)
                if moment is not None:  # None only for SGD, which returned above
                    never = moment == 0
                    rate.masked_fill_(never, math.nan)
                    rates.excluded += int(never.sum())
            rates[p] = rate
    return rates


def rate_statistics(
    rates: Iterable[Tensor], quantiles: Sequence[float] = (0.5,)
) -> dict[str, float]:
    """``rate_min``, ``rate_max`` and ``rate_q{q}`` over all elements of ``rates``.

    Quantiles interpolate linearly between order statistics (numpy's default). They are
    exact up to :data:`EXACT_QUANTILE_LIMIT` elements in total; above, they are computed on
    a fixed-seed uniform sample of that many elements (min and max stay exact). NaN rates,
    the elements ``effective_lr(..., exclude_zero_second_moment=True)`` left out, are not
    counted.
    """
    _check_quantiles(quantiles)
    flats = [r.detach().reshape(-1) for r in rates]
    flats = [f[~f.isnan()] if f.isnan().any() else f for f in flats]
    flats = [f for f in flats if f.numel()]
    extremes = [torch.aminmax(f) for f in flats]
    stats = {
        "rate_min": min((_float(e.min) for e in extremes), default=math.nan),
        "rate_max": max((_float(e.max) for e in extremes), default=math.nan),
    }
    stats.update(_quantiles(flats, quantiles))
    return stats


def _check_quantiles(quantiles: Sequence[float]) -> None:
    for q in quantiles:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must lie in [0, 1], got {q}")


def _quantiles(flats: list[Tensor], quantiles: Sequence[float]) -> dict[str, float]:
    if not quantiles:
        return {}
    if not flats:
        return {_qkey(q): math.nan for q in quantiles}
    values = _sorted_sample(flats)
    return {_qkey(q): _interpolate(values, q) for q in quantiles}


def _qkey(q: float) -> str:
    return f"rate_q{q:g}"


def _sorted_sample(flats: list[Tensor]) -> Tensor:
    total = sum(f.numel() for f in flats)
    if total <= EXACT_QUANTILE_LIMIT:
        return torch.cat([f.float().cpu() for f in flats]).sort().values
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, total, (EXACT_QUANTILE_LIMIT,), generator=generator).sort().values
    offsets = torch.tensor([0] + [f.numel() for f in flats]).cumsum(0)
    cuts = torch.searchsorted(picks, offsets).tolist()
    parts = []
    for i, f in enumerate(flats):
        local = picks[cuts[i] : cuts[i + 1]] - offsets[i]
        parts.append(f[local.to(f.device)].float().cpu())
    return torch.cat(parts).sort().values


def _interpolate(values: Tensor, q: float) -> float:
    position = q * (values.numel() - 1)
    below = math.floor(position)
    above = min(below + 1, values.numel() - 1)
    low, high = float(values[below]), float(values[above])
    if low == high:  # also keeps inf endpoints from turning into nan
        return low
    return low + (high - low) * (position - below)


def param_names(optimizer: Optimizer, names: Names = None) -> dict[Tensor, str]:
    """A name for every parameter of ``optimizer``: from ``names`` (a module, a mapping
    name -> parameter, or ``(name, parameter)`` pairs) where given, else ``group{g}.param{i}``.
    """
    given: dict[Tensor, str] = {}
    if names is not None:
        if isinstance(names, nn.Module):
            pairs: Iterable[tuple[str, Tensor]] = names.named_parameters()
        elif isinstance(names, Mapping):
            pairs = names.items()
        else:
            pairs = names
        for name, p in pairs:
            given.setdefault(p, name)
    result = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            result[p] = given.get(p, f"group{g}.param{i}")
    return result


@dataclass(frozen=True)
class ParamActivity:
    """Bound activity of one parameter: fractions of its elements, and its current bounds."""

    name: str
    numel: int
    step: int
    lower: float  # fraction of elements whose rate is pinned at the lower bound
    upper: float  # ... at the upper bound
    free: float  # ... strictly between the bounds (Adam-like)
    lower_bound: float  # absolute rates: the band the last step clipped into
    upper_bound: float
    rate_min: float
    rate_max: float


@dataclass(frozen=True)
class BoundActivity:
    """Where the per-element rates of a dynabound optimizer sit relative to their bounds.

    ``lower``, ``upper`` and ``free`` are fractions of all stepped elements (weighted by
    element count). ``lower_bound``/``upper_bound`` are the envelope of the current bounds
    (smallest lower and largest upper over parameters; they are the common bounds when all
    parameters share lr and step). ``transition`` is ``lower + upper``: the share of elements
    whose rate is set by the bounds, i.e. that already move like SGD. It is near 0 in the
    Adam-like phase and reaches 1 once the band has closed in on ``final_lr``.
    """

    lower: float
    upper: float
    free: float
    lower_bound: float
    upper_bound: float
    step: int
    rates: dict[str, float]
    params: tuple[ParamActivity, ...] = field(default=())
    # Per param group: the final_lr its last step used (NaN before final_lr="auto" has its
    # first sample) and whether it is still estimating it.
    final_lrs: tuple[float, ...] = field(default=())
    estimating: tuple[bool, ...] = field(default=())

    @property
    def transition(self) -> float:
        return self.lower + self.upper

    def summary(self) -> dict[str, float]:
        """Flat overall figures: fractions, transition, rate statistics, bounds, step."""
        return {
            "step": float(self.step),
            "lower": self.lower,
            "upper": self.upper,
            "free": self.free,
            "transition": self.transition,
            "lower_bound": self.lower_bound,
            "upper_bound": self.upper_bound,
            "rate_median": self.rates.get("rate_q0.5", float("nan")),
            **self.rates,
            **self._final_lr_summary(),
        }

    def _final_lr_summary(self) -> dict[str, float]:
        """``final_lr`` (and ``final_lr_estimating``, 1 or 0) of a single group; with
        several, one ``final_lr/{i}`` per group and the number still estimating."""
        if len(self.final_lrs) == 1:
            return {
                "final_lr": self.final_lrs[0],
                "final_lr_estimating": float(self.estimating[0]),
            }
        flat = {f"final_lr/{i}": value for i, value in enumerate(self.final_lrs)}
        flat["final_lr_estimating"] = float(sum(self.estimating))
        return flat

    def per_param(self) -> dict[str, float]:
        """Flat per-parameter fractions: ``{name}/lower``, ``{name}/upper``, ``{name}/free``."""
        flat = {}
        for a in self.params:
            flat[f"{a.name}/lower"] = a.lower
            flat[f"{a.name}/upper"] = a.upper
            flat[f"{a.name}/free"] = a.free
        return flat


def bound_activity(
    optimizer: Optimizer,
    rtol: float = 1e-6,
    *,
    names: Names = None,
    quantiles: Sequence[float] = (0.5,),
) -> BoundActivity:
    """Fractions of elements at the lower bound, at the upper bound and free, per parameter
    and overall, with the current bounds and effective-rate statistics (see
    :func:`rate_statistics`; the median is always included in ``summary()``).

    An element counts as pinned at a bound when its unclipped rate is within ``rtol``
    (relative) of that bound or beyond it; when the bounds coincide it counts as lower.
    Only dynabound optimizers have bounds: others raise ``TypeError``.
    """
    if not isinstance(optimizer, AdaBound):
        raise TypeError(
            f"bound_activity needs a dynabound optimizer (AdaBound, AMSBound, AdaBoundW, "
            f"AMSBoundW); {type(optimizer).__name__} has no rate bounds. Use effective_lr "
            f"for its per-element rates."
        )
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    if 0.5 not in quantiles:
        quantiles = (*quantiles, 0.5)
    _check_quantiles(quantiles)
    labels = param_names(optimizer, names)
    params: list[ParamActivity] = []
    flats: list[Tensor] = []
    counts = {"lower": 0, "upper": 0, "numel": 0}
    with torch.no_grad():
        for group, p, state in _stepped(optimizer):
            if p.numel() == 0:
                continue
            r = _dynabound_rate(group, state)
            # Unclipped rates at or beyond a bound; equal bounds count as lower.
            low_edge, high_edge = r.lower * (1 + rtol), r.upper * (1 - rtol)
            n_lower = int((r.raw <= low_edge).sum())
            at_upper = r.raw >= high_edge
            if high_edge <= low_edge:
                at_upper &= r.raw > low_edge
            n_upper, numel = int(at_upper.sum()), r.raw.numel()
            counts["lower"] += n_lower
            counts["upper"] += n_upper
            counts["numel"] += numel
            # Clamping and scaling are monotone, so the rate's extremes come from raw's.
            extremes = torch.stack(r.raw.aminmax()).clamp_(r.lower, r.upper).mul_(r.absolute)
            flats.append(r.rate.reshape(-1))
            params.append(
                ParamActivity(
                    name=labels[p],
                    numel=numel,
                    step=int(r.step),
                    lower=n_lower / numel,
                    upper=n_upper / numel,
                    free=(numel - n_lower - n_upper) / numel,
                    lower_bound=r.lower * r.absolute,
                    upper_bound=r.upper * r.absolute,
                    rate_min=_float(extremes[0]),
                    rate_max=_float(extremes[1]),
                )
            )
    n = counts["numel"]
    nan = float("nan")
    return BoundActivity(
        lower=counts["lower"] / n if n else nan,
        upper=counts["upper"] / n if n else nan,
        free=(n - counts["lower"] - counts["upper"]) / n if n else nan,
        lower_bound=min((a.lower_bound for a in params), default=nan),
        upper_bound=max((a.upper_bound for a in params), default=nan),
        step=max((a.step for a in params), default=0),
        rates={
            "rate_min": min((a.rate_min for a in params), default=nan),
            "rate_max": max((a.rate_max for a in params), default=nan),
            **_quantiles(flats, quantiles),
        },
        params=tuple(params),
        final_lrs=tuple(_last_final_lr(optimizer, group) for group in optimizer.param_groups),
        estimating=tuple(group["final_lr"] == AUTO for group in optimizer.param_groups),
    )


def _last_final_lr(optimizer: Optimizer, group: dict[str, Any]) -> float:
    steps = [_step(s) for p in group["params"] if (s := optimizer.state.get(p))]
    final_lr = final_lr_at(group, int(max(steps, default=0)))
    return float("nan") if final_lr is None else final_lr
