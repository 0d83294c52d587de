"""prodigy_dist: a sharding-aware Prodigy + Schedule-Free optimizer for PyTorch.

    from prodigy_dist import ProdigyPlusScheduleFree
"""

from .optimizer import ProdigyPlusScheduleFree

__all__ = ["ProdigyPlusScheduleFree"]
__version__ = "0.1.0"
