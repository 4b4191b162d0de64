"""Curvature of the policy: the exact Fisher (dense and as products) and every practical F⁻¹."""

from .cg import CGInfo, conjugate_gradient
from .curvature import CG, Curvature, Dense, Identity
from .dense import dense_fisher
from .diagonal import Diagonal
from .empirical import Empirical, per_sample_scores
from .fvp import fisher_vector_product, kl_hessian_vector_product
from .kfac import KFAC

__all__ = ["CG", "CGInfo", "Curvature", "Dense", "Diagonal", "Empirical", "Identity", "KFAC", "conjugate_gradient",
           "dense_fisher", "fisher_vector_product", "kl_hessian_vector_product", "per_sample_scores"]
