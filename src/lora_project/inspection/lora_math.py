"""Linear algebra of LoRA updates, computed from the small factors.

For one module the update is dW = s * B @ A with B (d_out x r), A (r x d_in) and
s = alpha / r (alpha / sqrt(r) with rsLoRA). Its SVD comes from the factors without ever
forming the d_out x d_in product:

    B = Q_B R_B,  A^T = Q_A R_A        (thin QR, Q_* orthonormal columns, R_* r x r)
    dW = s * Q_B (R_B R_A^T) Q_A^T,    R_B R_A^T = U_r S V_r^T   (an r x r SVD)
    => singular values s * S, left vectors Q_B U_r, right vectors Q_A V_r.

Definitions used in reports (LoRA paper, Hu et al. 2021, section 7):

* stable rank = ||dW||_F^2 / ||dW||_2^2
* effective rank = exp(H(p)), p_i = sigma_i^2 / sum_j sigma_j^2 (entropy of the normalised
  squared singular values)
* subspace similarity phi(A, B, i, j) = ||U_A,i^T U_B,j||_F^2 / min(i, j), with U_X,i the
  top-i right singular vectors of adapter X's update (eq. 4)
* amplification factor = ||dW||_F / ||U^T W0 V||_F, U and V the r left/right singular
  vectors of dW (section 7.3)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FactorSVD:
    """SVD of scale * B @ A computed from the factors: U, singular values, V."""
    singular_values: torch.Tensor  # (r,), descending
    left: torch.Tensor             # (d_out, r)
    right: torch.Tensor            # (d_in, r)


def factor_svd(A: torch.Tensor, B: torch.Tensor, scale: float) -> FactorSVD:
    """SVD of the update scale * B @ A from QR of each factor and an r x r SVD."""
    A64, B64 = A.double(), B.double()
    q_b, r_b = torch.linalg.qr(B64)       # B = Q_B R_B
    q_a, r_a = torch.linalg.qr(A64.T)     # A^T = Q_A R_A
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return FactorSVD(singular_values=s * abs(scale), left=q_b @ u, right=q_a @ vh.T)


def stable_rank(s: torch.Tensor) -> float:
    """||dW||_F^2 / ||dW||_2^2 from the singular values."""
    top = float(s.max()) if s.numel() else 0.0
    return float((s ** 2).sum() / top ** 2) if top > 0 else 0.0


def effective_rank(s: torch.Tensor) -> float:
    """exp of the entropy of the normalised squared singular values."""
    energy = s.double() ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    p = energy / total
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def subspace_similarity(right_a: torch.Tensor, right_b: torch.Tensor, i: int, j: int) -> float:
    """phi(A, B, i, j) for right-singular-vector matrices (d_in x r, columns by descending sigma)."""
    ua, ub = right_a[:, :i], right_b[:, :j]
    return float(torch.linalg.matrix_norm(ua.T @ ub) ** 2 / min(i, j))


def amplification(svd: FactorSVD, w0: torch.Tensor) -> float:
    """How much the update amplifies directions that W0 itself does not emphasise (LoRA paper, section 7.3)."""
    proj = svd.left.T @ w0.double() @ svd.right  # U^T W0 V  (r x r)
    denom = float(torch.linalg.matrix_norm(proj))
    return float(torch.linalg.vector_norm(svd.singular_values)) / denom if denom > 0 else float("inf")
