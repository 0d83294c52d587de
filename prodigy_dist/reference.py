"""A readable, unoptimised reference implementation of the math (one process, one parameter at a time).

It follows ALGORITHM.md Part B with the Part A decisions (correct factoring for every shape, the Prodigy-mode fixes
of cautious and ADOPT, Muon, layout-independent stochastic rounding). Tests hold the fast, sharded and DeepSpeed
paths to it step by step. It makes no attempt to be fast: host synchronisations and temporaries are everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from .kernels import ATAN2_SCALE, FOCUS_GAMMA
from .layout import SLICE, factored_dims
from .muon import muon_direction
from .options import DEFAULTS, validate_group
from .rounding import write_back_
from .scalars import harmonic_mean, speed_beta, step_scalars, update_d



def sample(t: torch.Tensor) -> torch.Tensor:
    """Every SLICE-th element of the flattened tensor: the Prodigy statistics sample (B §3.5)."""
    return t.reshape(-1)[::SLICE]


class ReferenceProdigyPlusScheduleFree(torch.optim.Optimizer):
    """Reference Prodigy + Schedule-Free. Same constructor as :class:`prodigy_dist.ProdigyPlusScheduleFree`."""

    def __init__(self, params, *, nonfinite_grads: str = "skip", sr_seed: int = 0, **options: Any):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"Unknown options: {sorted(unknown)}")
        defaults = dict(DEFAULTS, **options)
        super().__init__(params, defaults)
        self.nonfinite_grads = nonfinite_grads
        self.sr_seed = sr_seed
        split = defaults["split_groups"] and len(self.param_groups) > 1
        for group in self.param_groups:
            validate_group(group)
            group.update(split_groups=split, d=group["d0"], d_prev=group["d0"], d_numerator=0.0, d_denom=0.0,
                         prev_d_numerator=0.0, max_d_numerator=0.0, shared_d=None, k=1, train_mode=True,
                         weight_sum=0.0, effective_lr=group["lr"], skipped_steps=0)

    # ---------------------------------------------------------------- train / eval
    @torch.no_grad()
    def _set_mode(self, train: bool) -> None:
        for group in self.param_groups:
            if not group["use_schedulefree"] or group["train_mode"] == train:
                continue
            beta1 = group["betas"][0]
            weight = 1 - beta1 if train else 1 - 1 / beta1
            for p in group["params"]:
                if "z" in self.state[p]:
                    p.lerp_(self.state[p]["z"], weight)
            group["train_mode"] = train

    def train(self) -> None:
        self._set_mode(True)

    def eval(self) -> None:
        self._set_mode(False)

    # ---------------------------------------------------------------- state
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if state:
            return state
        stat_dtype = torch.bfloat16 if p.dtype == torch.float32 else p.dtype
        dims = factored_dims(tuple(p.shape), group["factored"] and not group["use_focus"])
        if dims is not None:
            dr, dc = dims
            fdtype = torch.float32 if group["factored_fp32"] else p.dtype
            row_shape, col_shape = list(p.shape), list(p.shape)
            row_shape[dr] = 1
            col_shape[dc] = 1
            state["exp_avg_sq_row"] = torch.zeros(row_shape, dtype=fdtype, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(col_shape, dtype=fdtype, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p)
        if group["use_schedulefree"]:
            state["z"] = p.detach().clone()
        else:
            state["exp_avg"] = torch.zeros_like(p)
        state["p0"] = sample(p).to(stat_dtype, copy=True)
        if not group["use_speed"]:
            state["s"] = torch.zeros_like(state["p0"])
        return state

    # ---------------------------------------------------------------- second moment
    @staticmethod
    def _denominator(state: dict, p: torch.Tensor, group: dict) -> torch.Tensor:
        """sqrt of the second moment estimate (FOCUS: the weight EMA itself), in the state's dtype."""
        if group["use_focus"]:
            return state["exp_avg_sq"].clone()
        if "exp_avg_sq_row" in state:
            dr, dc = factored_dims(tuple(p.shape), True)
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row_mean = row.sum(dim=dc, keepdim=True) / p.shape[dc] + 1e-30  # correct Adafactor for every shape (A4)
            return (row / row_mean * col).sqrt()
        return state["exp_avg_sq"].sqrt()

    @staticmethod
    def _update_second_moment(state: dict, p: torch.Tensor, g: torch.Tensor, w: torch.Tensor, d: float,
                              beta2: float, group: dict) -> None:
        # In-place EMAs in the state's dtype: v <- beta2 * v + (1 - beta2) * d^2 * (new term).
        if group["use_focus"]:  # FOCUS: the slot holds a d^2-scaled EMA of the weights
            state["exp_avg_sq"].mul_(beta2).add_(w, alpha=(1 - beta2) * d * d)
        elif "exp_avg_sq_row" in state:
            dr, dc = factored_dims(tuple(p.shape), True)
            row_mean_sq = (g * g).sum(dim=dr, keepdim=True) * (1 / p.shape[dr])  # mean of g^2 along dr
            col_mean_sq = (g * g).sum(dim=dc, keepdim=True) * (1 / p.shape[dc])
            state["exp_avg_sq_row"].mul_(beta2).add_(row_mean_sq, alpha=(1 - beta2) * d * d)
            state["exp_avg_sq_col"].mul_(beta2).add_(col_mean_sq, alpha=(1 - beta2) * d * d)
        elif "exp_avg_sq" in state:
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=(1 - beta2) * d * d)

    @staticmethod
    def _normalise(num: torch.Tensor, denom: torch.Tensor, w: torch.Tensor, d: float, group: dict) -> torch.Tensor:
        """The normalised update from a numerator (d*g or m) and the denominator (B §3.1.5, §4.8)."""
        if group["use_focus"]:
            return torch.sign(num) - FOCUS_GAMMA * torch.sign(denom.float() - w)
        if group["eps"] is None:
            return ATAN2_SCALE * torch.atan2(num, denom.float())
        return num / (denom + d * group["eps"]).float()

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_schedulefree"] and not group["train_mode"]:
                raise RuntimeError("step() called in eval mode: call optimizer.train() before training steps")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            if self.nonfinite_grads == "raise":
                raise FloatingPointError("non-finite gradient; step not applied")
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return loss

        split = self.param_groups[0]["split_groups"]
        device = grads[0].device if grads else None
        num = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.param_groups]
        den = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.param_groups]
        position = 0  # of the parameter in the optimizer (its stochastic rounding noise depends on it)
        for gi, group in enumerate(self.param_groups):
            sc = step_scalars(group)
            acc = gi if split else 0
            stepped = False
            for p in group["params"]:
                if p.grad is not None:
                    stepped |= self._step_param(p, group, sc, num, den, acc, position)
                position += 1
            if stepped and group["use_schedulefree"]:
                group["running_weight_sum"] = sc["weight_sum"]
                group["effective_lr"] = group["lr"] * sc["xy"]
        self._end_step(num, den)
        return loss

    def _step_param(self, p, group, sc, num, den, acc, position: int) -> bool:
        state = self._init_state(p, group)
        sf = group["use_schedulefree"]
        d, beta1, beta2 = sc["d"], sc["beta1"], sc["beta2"]
        g = p.grad.float()
        y = p.float()
        z = state["z"].float() if sf else None
        w = z if sf else y  # the weights that FOCUS and OrthoGrad look at
        muon = group["use_muon_pp"] and p.dim() >= 2

        if sc["adopt_first"]:  # ADOPT's first step only initialises the second moment
            self._update_second_moment(state, p, g, w, d, 0.0, group)
            return False

        denom = None
        if group["use_adopt"]:
            denom = self._denominator(state, p, group)  # the second moment lags one step
        self._update_second_moment(state, p, g, w, d, beta2, group)
        if denom is None:
            denom = self._denominator(state, p, group)

        if sf:
            if sc["raw_update"]:
                u = g.clone()
            else:
                u = self._normalise(d * g, denom, w, d, group)
                if muon:  # Muon: the orthogonalised gradient, with the RMS of the Adam-path update
                    u = muon_direction(g) * (torch.linalg.vector_norm(u).square() / u.numel()).sqrt()
        else:
            m = state["exp_avg"]
            if group["use_adopt"]:
                ghat = self._normalise(d * g, denom, w, d, group)
                bound = sc["k"] ** 0.25
                m.mul_(beta1).add_(ghat.clamp(-bound, bound), alpha=1 - beta1)
                mf = m.float()
                if group["use_cautious"]:
                    u = mf * self._cautious_mask(ghat * mf)
                elif group["use_grams"]:
                    u = torch.sign(ghat) * mf.abs()
                else:
                    u = mf
            else:
                m.mul_(beta1).add_(g, alpha=(1 - beta1) * d)
                mf = m.float()
                if group["use_cautious"]:
                    mf = mf * self._cautious_mask(g * mf)
                elif group["use_grams"]:
                    mf = torch.sign(g) * mf.abs()
                u = self._normalise(mf, denom, w, d, group)
                if muon:
                    u = muon_direction(mf) * (torch.linalg.vector_norm(u).square() / u.numel()).sqrt()

        if group["use_orthograd"]:
            u = self._orthograd(w, u)
        if group["use_stableadamw"] and group["eps"] is not None:
            rms = (torch.linalg.vector_norm(u).square() / u.numel()).sqrt()
            u = u / rms.clamp_min(1.0).sqrt()

        if sc["prodigy_active"]:
            self._prodigy_statistics(p, state, group, sc, num, den, acc)
        else:
            state.pop("p0", None)
            state.pop("s", None)

        dlr, lam = sc["dlr"], group["weight_decay"]
        if sf:
            c, xy = sc["c"], sc["xy"]
            y_old = y.clone()
            # torch.add(a, b, alpha=s) is a + s * b
            if lam != 0 and group["weight_decay_by_lr"]:
                u = torch.add(u, y, alpha=lam)
            if group["use_cautious"] or group["use_grams"]:
                big_u = torch.add((y - z) * c, u, alpha=dlr * xy)  # the total decrement of y
                z = torch.add(z, u, alpha=-dlr)
                if group["use_cautious"]:
                    y = y - big_u * self._cautious_mask(u * big_u)
                else:
                    y = y - big_u.abs() * torch.sign(u)
            else:
                y = torch.add(torch.lerp(y, z, c), u, alpha=-dlr * xy)  # (1 - c) y + c z - dlr xy u
                z = torch.add(z, u, alpha=-dlr)
            if lam != 0 and not group["weight_decay_by_lr"]:
                z = torch.add(z, y_old, alpha=-lam)
                y = torch.add(y, y_old, alpha=-lam * xy)
        else:
            decay = lam * (dlr if group["weight_decay_by_lr"] else 1.0)
            y = torch.add(y * (1 - decay), u, alpha=-dlr)

        step = group["k"]
        write_back_(p, y, group["stochastic_rounding"], flat_offset=0, key=position, seed=self.sr_seed, step=step,
                    stream=0)
        if sf:
            write_back_(state["z"], z, group["stochastic_rounding"], flat_offset=0, key=position, seed=self.sr_seed,
                        step=step, stream=1)
        return True

    @staticmethod
    def _cautious_mask(product: torch.Tensor) -> torch.Tensor:
        mask = (product > 0).float()
        return mask / mask.mean().clamp_min(1e-3)

    @staticmethod
    def _orthograd(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if torch.linalg.vector_norm(w) <= 1e-30:
            return u
        wf, uf = w.reshape(-1), u.reshape(-1)
        proj = torch.dot(wf, uf) / (torch.dot(wf, wf) + 1e-30)
        orth = uf - proj * wf
        return (orth * (torch.linalg.vector_norm(uf) / (torch.linalg.vector_norm(orth) + 1e-30))).view_as(u)

    def _prodigy_statistics(self, p, state, group, sc, num, den, acc) -> None:
        """Accumulate this parameter's contribution to the Prodigy numerator and denominator (B §3.5, §4.3)."""
        data = state["z"] if group["use_schedulefree"] else p
        gs = sample(p.grad)
        e = state["p0"] - sample(data)  # fp32 for fp32 params, bf16 for bf16 params
        dot = torch.dot(gs.to(e.dtype), e).float()
        delta = sc["delta"]
        if group["use_speed"]:
            beta = speed_beta(sc["k"])
            prev = state.get("exp_avg_x0_dot", dot)
            dot = prev * beta + dot * (1 - beta)
            state["exp_avg_x0_dot"] = dot
            floor = torch.tensor(1e-8, device=e.device)
            l1 = torch.maximum(e.float().abs().sum(), state.get("max_x0_minus_l1_norm", floor))
            l2 = torch.maximum(torch.linalg.vector_norm(e.float()), state.get("max_x0_minus_l2_norm", floor))
            state["max_x0_minus_l1_norm"], state["max_x0_minus_l2_norm"] = l1, l2
            den[acc] += l2
            num[acc] += (delta / (l2 + 1) ** 2) * dot / l1
        else:
            s = state["s"]
            s.mul_(sc["beta3"]).add_(gs, alpha=delta)
            den[acc] += s.float().abs().sum().to(s.dtype).float()
            num[acc] += delta * dot

    def _end_step(self, num, den) -> None:
        groups = self.param_groups
        split = groups[0]["split_groups"]
        for gi, group in enumerate(groups if split else groups[:1]):
            update_d(group, float(num[gi]), float(den[gi]))
        if split and groups[0]["split_groups_mean"]:
            shared = harmonic_mean([g["d"] for g in groups])
            for g in groups:
                g["shared_d"] = shared
        if not split:
            for g in groups[1:]:
                for key in ("d", "d_prev", "d_numerator", "d_denom", "prev_d_numerator", "max_d_numerator"):
                    g[key] = groups[0][key]
        for g in groups:
            if "running_weight_sum" in g:
                g["weight_sum"] = g["running_weight_sum"]
            if not g["use_schedulefree"]:
                g["effective_lr"] = g["lr"]
            g["k"] += 1
