"""Dynamic loss scaling for float16, driven by a found-inf flag that stays on the device.

``GradScaler`` unscales in its own pass (``unscale_``) and keeps the flag to itself; our finalize
kernel already computes the flag and folds the unscale into its single write pass, so the scale
update only needs the flag: grow by ``growth_factor`` after ``growth_interval`` clean steps,
shrink by ``backoff_factor`` after an overflow (the same rule and op GradScaler uses).
"""
from __future__ import annotations

import torch


class LossScaler:
    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def inv_scale(self) -> torch.Tensor:
        return self.scale.double().reciprocal()

    def get_scale(self) -> float:
        return float(self.scale)

    def update(self, found_inf: torch.Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf.to(self.scale.device, torch.float32),
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "growth_tracker": int(self.growth_tracker),
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(state["scale"])
        self.growth_tracker.fill_(state["growth_tracker"])
        self.growth_factor = state["growth_factor"]
        self.backoff_factor = state["backoff_factor"]
        self.growth_interval = state["growth_interval"]
