"""Curvature of the policy: the exact Fisher (dense and as products) and every practical F⁻¹."""

from .cg import CGInfo, conjugate_gradient
from .curvature import CG, Curvature, Dense, Identity
from .dense import dense_fisher
from .fvp import fisher_vector_product, kl_hessian_vector_product

__all__ = ["CG", "CGInfo", "Curvature", "Dense", "Identity", "conjugate_gradient", "dense_fisher",
           "fisher_vector_product", "kl_hessian_vector_product"]
