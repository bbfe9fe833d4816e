"""deepmomentum: deep-memory optimizers for PyTorch (Nested Learning, Behrouz et al. 2025).

Every optimizer here is a ``torch.optim.Optimizer`` whose momentum is read as an associative
memory of the gradient stream; see docs/spec.md in the repository for the rules and the
reductions they satisfy.
"""

from . import functional
from .deep import DMGD, DeepMomentum
from .frequency import MultiFrequency, WindowLog, continuum_groups
from .momentum import AssociativeMomentum, DeltaMomentum
from .muon import M3, Muon, muon_param_groups
from .newton_schulz import newton_schulz
from .optimizer import MemoryOptimizer, UnsupportedTensorError
from .preconditioned import PreconditionedMomentum

__version__ = "0.1.0"

__all__ = [
    "AssociativeMomentum",
    "DMGD",
    "DeepMomentum",
    "DeltaMomentum",
    "M3",
    "MultiFrequency",
    "WindowLog",
    "continuum_groups",
    "Muon",
    "muon_param_groups",
    "newton_schulz",
    "MemoryOptimizer",
    "PreconditionedMomentum",
    "UnsupportedTensorError",
    "functional",
    "__version__",
]
