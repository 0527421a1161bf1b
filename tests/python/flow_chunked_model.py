"""The chunked form of causal Flow-Attention that its fused kernel is to compute (kernels/flow_attention/DESIGN.md),
as a float64 model: chunks of `chunk` rows, each from the state at its start and its own products only.

State at a chunk's start, per (batch, head): n0 (valid rows so far), the vectors K0 = sum k, Q0 = sum q,
A0 = sum O k, B0 = sum I q, the competition's running maximum m0 and sum E0 = sum exp(Oh - m0), and
S0 = sum k (c v)^T. A chunk needs, besides them, G = q k^T and H = k q^T (both kept on the diagonal and below) and
prefix sums over its rows (products with the lower-triangular ones matrix).
"""

import torch


def causal_flow_chunked(q, k, v, valid, *, eps, clamp, chunk):
    """out (B, H, L, M) from the features q, k (B, H, L, D), v (B, H, L, M) and valid (B, L) (True: not padding)."""
    B, H, L, D = q.shape
    M = v.shape[-1]
    f = dict(dtype=q.dtype, device=q.device)
    m_all = valid[:, None, :].to(q.dtype).expand(B, H, L)  # (B, H, L)
    q, k = q * m_all[..., None], k * m_all[..., None]  # padded rows contribute nothing
    n0 = torch.zeros(B, H, **f)
    K0, Q0, A0, B0 = (torch.zeros(B, H, D, **f) for _ in range(4))
    S0 = torch.zeros(B, H, D, M, **f)
    m0 = torch.full((B, H), float("-inf"), **f)
    E0 = torch.zeros(B, H, **f)
    out = torch.zeros(B, H, L, M, **f)
    e2 = D * eps * eps
    for c0 in range(0, L, chunk):
        qc, kc, vc, m = q[:, :, c0:c0 + chunk], k[:, :, c0:c0 + chunk], v[:, :, c0:c0 + chunk], m_all[:, :, c0:c0 + chunk]
        T = qc.shape[2]
        tri = torch.ones(T, T, **f).tril()  # [t, j]: j <= t
        n = n0[..., None] + m.cumsum(-1)  # n_t
        safe_n = n.clamp(min=1)
        G = (qc @ kc.transpose(-1, -2)) * tri  # G[t, j] = <q_t, k_j>, j <= t
        Ht = (kc @ qc.transpose(-1, -2)) * tri  # H[t, i] = <k_t, q_i>, i <= t
        sq, sk = qc.sum(-1), kc.sum(-1)  # row sums over D
        prefix = lambda x: x @ tri.T  # noqa: E731  (prefix[t] = sum_{j <= t} x_j, over the last axis)
        # <x + eps, Y_t + eps> = <x, Y_t> + eps sum(x) + eps sum(Y_t) + D eps^2, Y_t = Y0 + the chunk's prefix
        qK = (qc @ K0[..., None])[..., 0] + G.sum(-1)
        I = n / (qK + eps * sq + eps * (K0.sum(-1)[..., None] + prefix(sk)) + e2)
        kQ = (kc @ Q0[..., None])[..., 0] + Ht.sum(-1)
        O = n / (kQ + eps * sk + eps * (Q0.sum(-1)[..., None] + prefix(sq)) + e2)
        I, O = I * m, O * m
        qA = (qc @ A0[..., None])[..., 0] + (G @ O[..., None])[..., 0]
        Ih = (qA + eps * sq + eps * (A0.sum(-1)[..., None] + prefix(O * sk)) + e2) / safe_n
        kB = (kc @ B0[..., None])[..., 0] + (Ht @ I[..., None])[..., 0]
        Oh = ((kB + eps * sk + eps * (B0.sum(-1)[..., None] + prefix(I * sq)) + e2) / safe_n).clamp(-clamp, clamp)
        a = torch.sigmoid(Ih)
        # the competition's running log-sum-exp over valid rows in order: m_t, E_t = sum_{j <= t} exp(Oh_j - m_t)
        logits = Oh.masked_fill(m == 0, float("-inf"))
        m_t = torch.maximum(m0[..., None], logits.cummax(-1).values)
        finite = torch.isfinite(m_t)
        shift = torch.where(finite, m_t, torch.zeros_like(m_t))
        upper = torch.full_like(tri, float("-inf")).triu(1)  # j > t: no term (before exp: no inf * 0)
        terms = torch.exp(logits[..., None, :] - shift[..., :, None] + upper)  # [t, j]: exp(Oh_j - m_t), j <= t
        E_t = torch.where(finite, E0[..., None] * torch.exp(m0[..., None] - shift), torch.zeros_like(shift))
        E_t = E_t + terms.sum(-1)
        c = torch.where(m > 0, n * torch.exp(Oh - shift) / E_t.clamp(min=torch.finfo(q.dtype).tiny), 0 * n)
        cv = vc * c[..., None]
        g = torch.where(m > 0, a * I / safe_n, 0 * n)
        out[:, :, c0:c0 + T] = g[..., None] * (G @ cv + qc @ S0)
        # the state at the next chunk's start
        S0 = S0 + kc.transpose(-1, -2) @ cv
        K0, Q0 = K0 + kc.sum(2), Q0 + qc.sum(2)
        A0 = A0 + (kc * O[..., None]).sum(2)
        B0 = B0 + (qc * I[..., None]).sum(2)
        n0, m0, E0 = n[..., -1], m_t[..., -1], E_t[..., -1]
    return out
