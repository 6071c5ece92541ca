"""usi: the USI recipe (Ridnik et al. 2022) for distilling any timm backbone from a frozen teacher."""
__version__ = "0.1.0"
