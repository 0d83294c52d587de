"""Per-group scalar rules, in plain Python: the Prodigy d rule, bias correction, Schedule-Free coefficients.

These run once per group per step on host floats (after the step's single host synchronisation), and are shared
by the fast optimizer and the reference implementation.
"""

from __future__ import annotations

from statistics import harmonic_mean  # noqa: F401  (the mean of the groups' d, B §3.6)
from typing import Any

from .options import beta3_of


def bias_correction(beta2: float, k: int) -> tuple[float, float, float]:
    """RAdam-style rectification (ALGORITHM.md B §4.2): returns (rect, beta2_corrected, rho_k)."""
    beta2_t = beta2 ** k
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_k = rho_inf - 2.0 * k * beta2_t / (1.0 - beta2_t)
    if rho_k > 4.0:
        rect = ((rho_k - 4.0) * (rho_k - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_k)) ** 0.5
    else:
        rect = 0.0
    return rect, 1.0 - (1.0 - beta2) / (1.0 - beta2_t), rho_k


def step_scalars(group: dict[str, Any]) -> dict[str, Any]:
    """The scalars a group's parameters use this step (B §3.1.3, §3.2, §4.2)."""
    beta1, beta2 = group["betas"]
    k = group["k"]
    shared_d = group.get("shared_d")
    use_shared = group["split_groups"] and group["split_groups_mean"] and shared_d is not None
    d = group["d"]
    dlr = (shared_d if use_shared else d) * group["lr"]
    raw_update = False
    if group["use_bias_correction"]:
        rect, beta2, rho_k = bias_correction(beta2, k)
        dlr *= rect
        raw_update = group["use_schedulefree"] and rho_k <= 4.0
    out = dict(d=d, dlr=dlr, beta1=beta1, beta2=beta2, beta3=beta3_of(group), k=k, raw_update=raw_update,
               delta=d * d / group["d0"] ** 0.5,
               prodigy_active=group["prodigy_steps"] <= 0 or k < group["prodigy_steps"],
               adopt_first=group["use_adopt"] and k == 1)
    if group["use_schedulefree"]:
        weight = dlr * dlr
        weight_sum = group.get("weight_sum", 0.0) + weight
        c = weight / weight_sum if weight_sum else 0.0
        if group["schedulefree_c"] > 0:
            c = min(1.0, c * (1.0 - beta1) * group["schedulefree_c"])
        out.update(weight_sum=weight_sum, c=c, xy=1.0 - beta1 * (1.0 - c))
    return out


def speed_beta(k: int) -> float:
    """EMA weight of the SPEED numerator at step k (B §4.3)."""
    return 1.0 - k ** -0.75


def update_d(group: dict[str, Any], numerator: float, denom: float) -> None:
    """End-of-step d update for one accumulating group (B §3.6, §4.3), in place on the group's scalars."""
    if group["prodigy_steps"] > 0 and group["k"] >= group["prodigy_steps"]:
        return
    d, d0 = group["d"], group["d0"]
    new_numerator = beta3_of(group) * group["d_numerator"]
    if d > d0 or numerator > 0:
        new_numerator += numerator
    prev_numerator = group["d_numerator"]
    max_numerator = max(new_numerator, group["max_d_numerator"])
    if group["use_speed"]:
        if new_numerator >= group["max_d_numerator"] and new_numerator > 0 and prev_numerator > 0:
            d_hat = min(2 ** 0.25, (new_numerator / prev_numerator) ** 0.5)
            d = max(d, d * d_hat * group["d_coef"] ** 0.125)
    elif denom > 0:
        d_hat = new_numerator / denom
        if group["d_limiter"]:
            d_hat = min(d_hat, d * 2 ** 0.25)
        d = max(d, group["d_coef"] * d_hat)
    group.update(prev_d_numerator=prev_numerator, max_d_numerator=max_numerator, d_numerator=new_numerator,
                 d_denom=denom, d_prev=group["d"], d=d)
