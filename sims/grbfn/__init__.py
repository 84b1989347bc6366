"""Growing RBF networks under a runtime growth gate, their baselines and peers (seed 000)."""

from sims.grbfn.baselines import LinUCB, LogReg, MLP
from sims.grbfn.gate import PROTOTYPES, GrowthGate, LocalGate, UnlimitedGate
from sims.grbfn.models import GRBFN, GRBFNPlastic

__all__ = ["GRBFN", "GRBFNPlastic", "GrowthGate", "LinUCB", "LocalGate", "LogReg", "MLP",
           "PROTOTYPES", "UnlimitedGate"]
