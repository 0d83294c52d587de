"""prodigy_dist: a sharding-aware Prodigy + Schedule-Free optimizer for PyTorch.

    from prodigy_dist import ProdigyPlusScheduleFree
"""

from .optimizer import ProdigyPlusScheduleFree
from .deepspeed import register_with_torch_optim as _register_with_torch_optim

# DeepSpeed configs name optimizers through torch.optim: "optimizer": {"type": "ProdigyPlusScheduleFree"}
_register_with_torch_optim()

__all__ = ["ProdigyPlusScheduleFree"]
__version__ = "0.1.0"
