"""Options of ProdigyPlusScheduleFree: defaults, validation and precedence rules.

Every option can be set per parameter group; :func:`validate_group` checks one group's values and raises
``ValueError``/``TypeError`` naming the option and the bad value.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

#: Constructor options and defaults (ALGORITHM.md Part A1), in constructor order.
DEFAULTS: dict[str, Any] = dict(
    lr=1.0,
    betas=(0.9, 0.99),
    beta3=None,
    weight_decay=0.0,
    weight_decay_by_lr=True,
    use_bias_correction=False,
    d0=1e-6,
    d_coef=1.0,
    d_limiter=True,
    prodigy_steps=0,
    use_speed=False,
    eps=1e-8,
    split_groups=True,
    split_groups_mean=True,
    factored=True,
    factored_fp32=True,
    fused_back_pass=False,
    use_stableadamw=True,
    use_muon_pp=False,
    use_cautious=False,
    use_grams=False,
    use_adopt=False,
    use_focus=False,
    use_orthograd=False,
    stochastic_rounding=True,
    schedulefree_c=0.0,
    use_schedulefree=True,
)

#: Options that must be the same in every group because they describe the optimizer, not a group.
GLOBAL_OPTIONS = ("split_groups", "split_groups_mean", "fused_back_pass")

BOOL_OPTIONS = tuple(k for k, v in DEFAULTS.items() if isinstance(v, bool))

NONFINITE_POLICIES = ("skip", "raise")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    if not _is_real(value):
        raise TypeError(f"Invalid {name}: {value!r} (expected a real number, got {type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'>' if low_open else '>='} {low})")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'<' if high_open else '<='} {high})")


def validate_group(group: dict[str, Any]) -> None:
    """Check the option values of one parameter group; raise on anything invalid or contradictory."""
    for name in BOOL_OPTIONS:
        if not isinstance(group[name], bool):
            raise TypeError(f"Invalid {name}: {group[name]!r} (expected True or False)")
    _check_real("lr", group["lr"], low=0.0, low_open=True)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    _check_real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    _check_real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    if group["beta3"] is not None:
        _check_real("beta3", group["beta3"], low=0.0, high=1.0, high_open=True)
    _check_real("weight_decay", group["weight_decay"], low=0.0)
    _check_real("d0", group["d0"], low=0.0, low_open=True)
    _check_real("d_coef", group["d_coef"], low=0.0, low_open=True)
    if not isinstance(group["prodigy_steps"], int) or isinstance(group["prodigy_steps"], bool):
        raise TypeError(f"Invalid prodigy_steps: {group['prodigy_steps']!r} (expected an int)")
    if group["prodigy_steps"] < 0:
        raise ValueError(f"Invalid prodigy_steps: {group['prodigy_steps']!r} (must be >= 0)")
    if group["eps"] is not None:
        _check_real("eps", group["eps"], low=0.0, low_open=True)
    _check_real("schedulefree_c", group["schedulefree_c"], low=0.0)

    # Contradictory combinations are errors, never silently disabled.
    if group["use_cautious"] and group["use_grams"]:
        raise ValueError("use_cautious=True and use_grams=True are mutually exclusive: choose one")
    if group["use_focus"] and group["eps"] is None:
        raise ValueError("use_focus=True cannot be combined with eps=None (Adam-atan2): FOCUS uses sign updates; "
                         "set eps to a number")
    if group["use_muon_pp"] and group["use_focus"]:
        raise ValueError("use_muon_pp=True and use_focus=True are mutually exclusive: choose one")
    if group["use_muon_pp"] and group["use_adopt"]:
        raise ValueError("use_muon_pp=True and use_adopt=True are mutually exclusive (Muon keeps no second moment "
                         "for ADOPT to lag): choose one")
    if group["use_schedulefree"] and group["betas"][0] == 0.0:
        raise ValueError("Invalid betas[0]: 0.0 with use_schedulefree=True (eval() divides by beta1); "
                         "use beta1 > 0")


def log_precedence_rules(group: dict[str, Any], index: int) -> None:
    """Log (once, at construction) the documented precedence rules that apply to a group."""
    if group["eps"] is None and group["use_stableadamw"]:
        logger.info("param group %d: eps=None (Adam-atan2) bounds the update itself; StableAdamW is not applied",
                    index)
    if group["use_focus"] and group["factored"]:
        logger.info("param group %d: use_focus keeps an unfactored weight EMA; factored=True has no effect", index)
    if group["use_speed"] and group["weight_decay"] > 0:
        logger.warning("param group %d: use_speed with weight_decay=%g can overestimate d; "
                       "lower weight_decay if training becomes unstable", index, group["weight_decay"])


def beta3_of(group: dict[str, Any]) -> float:
    """beta3 of a group: its own value, or sqrt(beta2) when None."""
    return group["beta3"] if group["beta3"] is not None else group["betas"][1] ** 0.5
