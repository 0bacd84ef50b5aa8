"""epcli: how robust are energy-based models trained with Equilibrium Propagation?"""

__version__ = "0.1.0"
