"""The forms of Flow-Attention that its fused kernels are to compute (kernels/flow_attention/DESIGN.md), as float64
models: causal in chunks of `chunk` rows, each from the state at its start and its own products only
(causal_flow_chunked), its gradients in two passes over the chunks (causal_flow_chunked_backward); non-causal in
four passes over segments (noncausal_flow_passes), its gradients in four more (noncausal_flow_backward_passes).

State at a chunk's start, per (batch, head): n0 (valid rows so far), the vectors K0 = sum k, Q0 = sum q,
A0 = sum O k, B0 = sum I q, the competition's running maximum m0 and sum E0 = sum exp(Oh - m0), and
S0 = sum k (c v)^T. A chunk needs, besides them, G = q k^T and H = k q^T (both kept on the diagonal and below) and
prefix sums over its rows (products with the lower-triangular ones matrix).
"""

import torch


class ChunkState:
    """The state at a chunk's start, per (batch, head)."""

    def __init__(self, B, H, D, M, **f):
        self.n = torch.zeros(B, H, **f)
        self.K, self.Q, self.A, self.B = (torch.zeros(B, H, D, **f) for _ in range(4))
        self.S = torch.zeros(B, H, D, M, **f)
        self.m = torch.full((B, H), float("-inf"), **f)
        self.E = torch.zeros(B, H, **f)


def causal_chunks(q, k, v, valid, *, eps, clamp, chunk):
    """Walks the chunks in order: yields (rows, the chunk's inputs, its per-row quantities, the state at its start)
    and then moves the state past the chunk. Features q, k (B, H, L, D), v (B, H, L, M), valid (B, L)."""
    B, H, L, D = q.shape
    f = dict(dtype=q.dtype, device=q.device)
    m_all = valid[:, None, :].to(q.dtype).expand(B, H, L)  # (B, H, L)
    q, k = q * m_all[..., None], k * m_all[..., None]  # padded rows contribute nothing
    st = ChunkState(B, H, D, v.shape[-1], **f)
    e2 = D * eps * eps
    for c0 in range(0, L, chunk):
        r = slice(c0, c0 + chunk)
        qc, kc, vc, m = q[:, :, r], k[:, :, r], v[:, :, r], m_all[:, :, r]
        T = qc.shape[2]
        tri = torch.ones(T, T, **f).tril()  # [t, j]: j <= t
        n = st.n[..., None] + m.cumsum(-1)  # n_t
        safe_n = n.clamp(min=1)
        G = (qc @ kc.transpose(-1, -2)) * tri  # G[t, j] = <q_t, k_j>, j <= t
        Ht = (kc @ qc.transpose(-1, -2)) * tri  # H[t, i] = <k_t, q_i>, i <= t
        sq, sk = qc.sum(-1), kc.sum(-1)  # row sums over D
        prefix = lambda x: x @ tri.T  # noqa: E731  (prefix[t] = sum_{j <= t} x_j, over the last axis)
        # <x + eps, Y_t + eps> = <x, Y_t> + eps sum(x) + eps sum(Y_t) + D eps^2, Y_t = Y0 + the chunk's prefix
        qK = (qc @ st.K[..., None])[..., 0] + G.sum(-1)
        I = n / (qK + eps * sq + eps * (st.K.sum(-1)[..., None] + prefix(sk)) + e2)
        kQ = (kc @ st.Q[..., None])[..., 0] + Ht.sum(-1)
        O = n / (kQ + eps * sk + eps * (st.Q.sum(-1)[..., None] + prefix(sq)) + e2)
        I, O = I * m, O * m
        qA = (qc @ st.A[..., None])[..., 0] + (G @ O[..., None])[..., 0]
        Ih = (qA + eps * sq + eps * (st.A.sum(-1)[..., None] + prefix(O * sk)) + e2) / safe_n
        kB = (kc @ st.B[..., None])[..., 0] + (Ht @ I[..., None])[..., 0]
        rr = (kB + eps * sk + eps * (st.B.sum(-1)[..., None] + prefix(I * sq)) + e2) / safe_n  # before the clamp
        Oh = rr.clamp(-clamp, clamp)
        a = torch.sigmoid(Ih)
        # the competition's running log-sum-exp over valid rows in order: m_t, E_t = sum_{j <= t} exp(Oh_j - m_t)
        logits = Oh.masked_fill(m == 0, float("-inf"))
        m_t = torch.maximum(st.m[..., None], logits.cummax(-1).values)
        finite = torch.isfinite(m_t)
        shift = torch.where(finite, m_t, torch.zeros_like(m_t))
        upper = torch.full_like(tri, float("-inf")).triu(1)  # j > t: no term (before exp: no inf * 0)
        terms = torch.exp(logits[..., None, :] - shift[..., :, None] + upper)  # [t, j]: exp(Oh_j - m_t), j <= t
        E_t = torch.where(finite, st.E[..., None] * torch.exp(st.m[..., None] - shift), torch.zeros_like(shift))
        E_t = E_t + terms.sum(-1)
        c = torch.where(m > 0, n * torch.exp(Oh - shift) / E_t.clamp(min=torch.finfo(q.dtype).tiny), 0 * n)
        g = torch.where(m > 0, a * I / safe_n, 0 * n)
        rows = dict(n=safe_n, I=I, O=O, a=a, rr=rr, c=c, g=g, m=shift, E=E_t, G=G, tri=tri)
        yield r, (qc, kc, vc, m), rows, st
        # the state at the next chunk's start
        nxt = ChunkState(B, H, D, v.shape[-1], **f)
        nxt.S = st.S + kc.transpose(-1, -2) @ (vc * c[..., None])
        nxt.K, nxt.Q = st.K + kc.sum(2), st.Q + qc.sum(2)
        nxt.A = st.A + (kc * O[..., None]).sum(2)
        nxt.B = st.B + (qc * I[..., None]).sum(2)
        nxt.n, nxt.m, nxt.E = n[..., -1], m_t[..., -1], E_t[..., -1]
        st = nxt


def causal_flow_chunked(q, k, v, valid, *, eps, clamp, chunk):
    """out (B, H, L, M) from the features q, k (B, H, L, D), v (B, H, L, M) and valid (B, L) (True: not padding)."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for r, (qc, _, vc, _), x, st in causal_chunks(q, k, v, valid, eps=eps, clamp=clamp, chunk=chunk):
        out[:, :, r] = x["g"][..., None] * (x["G"] @ (vc * x["c"][..., None]) + qc @ st.S)
    return out


def _in_order(parts):
    """The sum of parts, added in their order (the host's order of a pass's segments)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _noncausal_sums(q, k, v, qvalid, kvalid, *, eps, clamp, segment):
    """Passes 1-3 of non-causal Flow-Attention over segments of `segment` rows (noncausal_flow_passes): the padded
    rows' features zeroed, the valid counts Lb, Sb (B, 1), the sums Q, K, A, B, the flows I, O, the unclamped
    sources r and the competition's maximum m, sum E and W = sum exp(Oh_j - m) k_j v_j^T."""
    qm = qvalid[:, None, :, None].to(q.dtype)
    km = kvalid[:, None, :, None].to(q.dtype)
    q, k = q * qm, k * km
    x = dict(q=q, k=k, qm=qm, km=km, Lb=qm.sum(2)[..., 0], Sb=km.sum(2)[..., 0])
    L, S = q.shape[2], k.shape[2]
    x["pieces"] = pieces = lambda n: [slice(s, s + segment) for s in range(0, n, segment)]  # noqa: E731
    x["Q"] = _in_order([q[:, :, r].sum(2) for r in pieces(L)])
    x["K"] = _in_order([k[:, :, r].sum(2) for r in pieces(S)])
    x["I"] = 1.0 / _dot_eps(q, x["K"], eps) * qm[..., 0]
    x["O"] = 1.0 / _dot_eps(k, x["Q"], eps) * km[..., 0]
    x["A"] = _in_order([(k[:, :, r] * x["O"][:, :, r, None]).sum(2) for r in pieces(S)])
    x["B"] = _in_order([(q[:, :, r] * x["I"][:, :, r, None]).sum(2) for r in pieces(L)])
    x["r"] = _dot_eps(k, x["B"], eps)
    Oh = x["r"].clamp(-clamp, clamp).masked_fill(km[..., 0] == 0, float("-inf"))
    m = torch.full(Oh.shape[:2], float("-inf"), dtype=q.dtype, device=q.device)
    E = torch.zeros_like(m)
    W = torch.zeros(*Oh.shape[:2], k.shape[-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for r in pieces(S):  # each segment's statistics, then added to the running ones in order
        m_s = Oh[:, :, r].max(-1).values
        m_new = torch.maximum(m, m_s)
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        w = torch.exp(Oh[:, :, r] - shift[..., None])
        old = torch.where(torch.isfinite(m), torch.exp(m - shift), torch.zeros_like(m))
        E = E * old + w.sum(-1)
        W = W * old[..., None, None] + k[:, :, r].transpose(-1, -2) @ (v[:, :, r] * w[..., None])
        m = m_new
    x.update(Oh=Oh, m=m, E=E, W=W)
    return x


def _dot_eps(x, y, eps):
    """<x_t + eps, y + eps> for the rows x_t (.., T, D) and a vector y (.., D)."""
    return ((x + eps) * (y[..., None, :] + eps)).sum(-1)


def noncausal_flow_passes(q, k, v, qvalid, kvalid, *, eps, clamp, segment):
    """Non-causal Flow-Attention as the fused kernels' four passes over segments of `segment` rows, each pass's
    segment results combined in segment order (fixed, deterministic). q (B, H, L, D), k (B, H, S, D), v (B, H, S, M),
    qvalid (B, L), kvalid (B, S).
      1. sums: Q = sum q, K = sum k
      2. flows: I_i = 1 / <q_i + e, K + e>, O_j = 1 / <k_j + e, Q + e>; sums A = sum O_j k_j, B = sum I_i q_i
      3. keys: Oh_j = clamp(<k_j + e, B + e>), the softmax's running maximum m and sum E = sum exp(Oh_j - m), and
         W = sum exp(Oh_j - m) k_j v_j^T against the same maximum (segments: rescaled to the larger one when added)
      4. queries: a_i = sigmoid(<q_i + e, A + e> L / S), out_i = a_i I_i q_i^T W S / E
    (L, S: the valid counts.)"""
    x = _noncausal_sums(q, k, v, qvalid, kvalid, eps=eps, clamp=clamp, segment=segment)
    q, qm, Lb, Sb = x["q"], x["qm"], x["Lb"], x["Sb"]
    a = torch.sigmoid(_dot_eps(q, x["A"], eps) * (Lb / Sb.clamp(min=1))[..., None])
    scale = (Sb / x["E"].clamp(min=torch.finfo(q.dtype).tiny))[..., None, None]
    out = (a * x["I"])[..., None] * (q @ (x["W"] * scale))
    empty = ((Lb == 0) | (Sb == 0))[:, :, None, None]
    return torch.where(empty | (qm == 0), torch.zeros_like(out), out)


def noncausal_flow_backward_passes(q, k, v, qvalid, kvalid, dout, *, eps, clamp, segment):
    """The gradients (dq, dk, dv) of non-causal Flow-Attention with respect to the features q, k and to v, in four
    passes over segments as a fused backward would make them, after the forward's sums (Q, K, A, B, m, E, W: small,
    saved or recomputed). With g_i = a_i I_i, c_j = S exp(Oh_j - m) / E (so that out_i = g_i q_i^T W, W = sum c_j
    k_j v_j^T) and sums over a side added segment by segment in order:
      1. queries: dW = sum g_i q_i dout_i^T, dg_i = <dout_i, q_i^T W>, dIh_i = dg_i I_i a_i (1 - a_i) L / S,
         dA = sum dIh_i (q_i + e)
      2. keys: dc_j = k_j^T dW v_j; the softmax's total sum_l c_l dc_l = <dW, W> (no pass of its own);
         dr_j = c_j (dc_j - <dW, W> / S) where |r_j| <= clamp; dB = sum dr_j (k_j + e); dO_j = <dA, k_j>,
         dQ = sum -dO_j O_j^2 (k_j + e)
      3. queries: dI_i = dg_i a_i + <dB, q_i>; dq_i = g_i W dout_i + dIh_i (A + e) + I_i dB - dI_i I_i^2 (K + e) + dQ;
         dK = sum -dI_i I_i^2 (q_i + e)
      4. keys: dk_j = c_j dW v_j + dr_j (B + e) + O_j dA - dO_j O_j^2 (Q + e) + dK; dv_j = c_j dW^T k_j
    Pass 3 needs pass 2's dB, pass 4 pass 3's dK: four passes, the queries' and keys' sides read twice each."""
    x = _noncausal_sums(q, k, v, qvalid, kvalid, eps=eps, clamp=clamp, segment=segment)
    q, k, qm, km, Lb, Sb, pieces = x["q"], x["k"], x["qm"], x["km"], x["Lb"], x["Sb"], x["pieces"]
    L, S = q.shape[2], k.shape[2]
    I, O, A, B, W = x["I"], x["O"], x["A"], x["B"], x["W"]
    empty = ((Lb == 0) | (Sb == 0))[:, :, None, None]
    dout = torch.where(empty | (qm == 0), torch.zeros_like(dout), dout)  # the outputs held at 0
    ratio = (Lb / Sb.clamp(min=1))[..., None]
    a = torch.sigmoid(_dot_eps(q, A, eps) * ratio)
    c = torch.where(km[..., 0] > 0, torch.exp(x["Oh"] - x["m"][..., None]), torch.zeros_like(x["r"]))
    c = c * (Sb / x["E"].clamp(min=torch.finfo(q.dtype).tiny))[..., None]
    W = W * (Sb / x["E"].clamp(min=torch.finfo(q.dtype).tiny))[..., None, None]  # sum c_j k_j v_j^T
    g = a * I
    # 1. queries
    dW = _in_order([q[:, :, r].transpose(-1, -2) @ (dout[:, :, r] * g[:, :, r, None]) for r in pieces(L)])
    dg = (dout * (q @ W)).sum(-1)
    dIh = dg * I * a * (1 - a) * ratio
    dA = _in_order([((q[:, :, r] + eps) * dIh[:, :, r, None]).sum(2) for r in pieces(L)])
    # 2. keys
    kdW = k @ dW  # rows k_j^T dW
    dc = (kdW * v).sum(-1)
    total = (dW * W).sum((-1, -2))[..., None]  # sum_l c_l dc_l
    dr = torch.where(x["r"].abs() <= clamp, c * (dc - total / Sb.clamp(min=1)[..., None]), torch.zeros_like(c))
    dB = _in_order([((k[:, :, r] + eps) * dr[:, :, r, None]).sum(2) for r in pieces(S)])
    dO = (k * dA[..., None, :]).sum(-1) * km[..., 0]
    dden_O = -dO * O * O
    dQ = _in_order([((k[:, :, r] + eps) * dden_O[:, :, r, None]).sum(2) for r in pieces(S)])
    # 3. queries
    dI = (dg * a + (q * dB[..., None, :]).sum(-1)) * qm[..., 0]
    dden_I = -dI * I * I
    dq = (g[..., None] * (dout @ W.transpose(-1, -2)) + dIh[..., None] * (A[..., None, :] + eps)
          + I[..., None] * dB[..., None, :] + dden_I[..., None] * (x["K"][..., None, :] + eps) + dQ[..., None, :])
    dK = _in_order([((q[:, :, r] + eps) * dden_I[:, :, r, None]).sum(2) for r in pieces(L)])
    # 4. keys
    dk = (c[..., None] * (v @ dW.transpose(-1, -2)) + dr[..., None] * (B[..., None, :] + eps)
          + O[..., None] * dA[..., None, :] + dden_O[..., None] * (x["Q"][..., None, :] + eps) + dK[..., None, :])
    dv = c[..., None] * kdW
    return dq * qm, dk * km, dv * km


def _suffix(x):
    """suffix[t] = sum_{t' >= t} x_t' over the last axis."""
    return x.flip(-1).cumsum(-1).flip(-1)


def causal_flow_chunked_backward(q, k, v, valid, dout, *, eps, clamp, chunk):
    """The gradients (dq, dk, dv) of causal Flow-Attention with respect to the features q, k and to v, in two
    passes over chunks as a fused backward would make them: queries in order (recomputing the forward state: dq
    through S_t and A_t, and each row's dg_t = <dout_t, q_t^T S_t> and dsink_t), then keys in reverse (carrying
    R = sum g q dout^T, the reverse sums RA, RB, RK, RQ of the normalisers' gradients and the competition's P), from
    per-row scalars and the vectors K, Q, B at each chunk's start saved by the first pass.
    (The per-row recurrence of P is a loop here; a kernel makes it an affine scan, factors exp(m_t - m_t') <= 1.)"""
    B_, H, L, D = q.shape
    f = dict(dtype=q.dtype, device=q.device)
    m_all = valid[:, None, :].to(q.dtype).expand(B_, H, L)
    q, k = q * m_all[..., None], k * m_all[..., None]
    names = ("n", "I", "O", "a", "rr", "c", "g", "m", "E", "dg", "dsink")
    rows = {name: torch.zeros(B_, H, L, **f) for name in names}  # per-row scalars of pass 1
    chunks, starts = [], []  # each chunk's rows, and (K0, Q0, B0) at its start
    dq = torch.zeros_like(q)
    # Pass 1, in order: the forward recomputed, with dq through S_t (out = g q^T S_t) and A_t (sink)
    for r, (qc, kc, vc, _), x, st in causal_chunks(q, k, v, valid, eps=eps, clamp=clamp, chunk=chunk):
        do, tri = dout[:, :, r], x["tri"]
        cv = vc * x["c"][..., None]
        dg = (do * (x["G"] @ cv + qc @ st.S)).sum(-1)  # <dout_t, q_t^T S_t>
        dsink = dg * x["I"] / x["n"] * x["a"] * (1 - x["a"]) / x["n"]
        # dq += g S_t dout_t + dsink (A_t + e): S_t dout_t = S0 dout_t + sum_{j<=t} k_j c_j <v_j, dout_t>
        masked_dv = (do @ vc.transpose(-1, -2)) * tri * x["c"][..., None, :]  # [t, j]: <dout_t, v_j> c_j, j <= t
        dq[:, :, r] = (x["g"][..., None] * (do @ st.S.transpose(-1, -2) + masked_dv @ kc)
                       + dsink[..., None] * (st.A[..., None, :] + eps + (tri * x["O"][..., None, :]) @ kc))
        for name in names:
            rows[name][:, :, r] = dict(x, dg=dg, dsink=dsink)[name]
        chunks.append(r)
        starts.append((st.K, st.Q, st.B))
    # Pass 2, in reverse: dk, dv and the rest of dq
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    R = torch.zeros(B_, H, D, v.shape[-1], **f)
    RA, RB, RK, RQ = (torch.zeros(B_, H, D, **f) for _ in range(4))
    P = torch.zeros(B_, H, **f)
    m_next = torch.zeros(B_, H, **f)
    has_next = torch.zeros(B_, H, dtype=torch.bool, device=q.device)
    for r, (K0, Q0, B0) in reversed(list(zip(chunks, starts))):
        qc, kc, vc, m, do = q[:, :, r], k[:, :, r], v[:, :, r], m_all[:, :, r], dout[:, :, r]
        T = qc.shape[2]
        tri = torch.ones(T, T, **f).tril()
        up = tri.T  # [t, t']: t' >= t
        n, I, O, a, rr, c, g, mm, E, dg, dsink = (rows[name][:, :, r] for name in names)
        gdo = do * g[..., None]
        QK = kc @ qc.transpose(-1, -2)  # [t, t'] = <k_t, q_t'>
        dw = kc @ R + (QK * up) @ gdo  # R_t^T k_t, R_t = R + sum_{t' >= t} g q dout^T
        dv[:, :, r] = c[..., None] * dw
        dc = (dw * vc).sum(-1)
        dk_c = c[..., None] * (vc @ R.transpose(-1, -2) + ((vc @ gdo.transpose(-1, -2)) * up) @ qc)  # c_t R_t v_t
        # P_t = dc_t c_t / E_t + exp(m_t - m_next) P_next over the valid rows, from the last
        Pt = torch.zeros_like(n)
        for t in reversed(range(T)):
            valid_t = m[..., t] > 0
            p_t = dc[..., t] * c[..., t] / E[..., t] + torch.where(has_next, torch.exp(mm[..., t] - m_next) * P, 0 * P)
            P = torch.where(valid_t, p_t, P)
            m_next = torch.where(valid_t, mm[..., t], m_next)
            has_next = has_next | valid_t
            Pt[..., t] = P
        dsource = dc * c - c * E / n * Pt
        dr = torch.where((rr.abs() <= clamp) & (m > 0), dsource / n, 0 * n)
        sq, sk = qc.sum(-1), kc.sum(-1)
        sdr = _suffix(dr)
        # RB_t = RB + sum_{t' >= t} dr_t' (k_t' + e): dI_t = dg a / n + <RB_t, q_t>; dq += I_t RB_t
        RB_t = RB[..., None, :] + (up * dr[..., None, :]) @ kc + eps * sdr[..., None]
        dI = (dg * a / n + (RB_t * qc).sum(-1)) * m
        B_t = B0[..., None, :] + (tri * I[..., None, :]) @ qc
        RA_t = RA[..., None, :] + (up * dsink[..., None, :]) @ qc + eps * _suffix(dsink)[..., None]
        dO = (RA_t * kc).sum(-1) * m
        du = -dI * I * I / n
        K_t = K0[..., None, :] + tri @ kc
        RK_t = RK[..., None, :] + (up * du[..., None, :]) @ qc + eps * _suffix(du)[..., None]
        dwo = -dO * O * O / n
        Q_t = Q0[..., None, :] + tri @ qc
        RQ_t = RQ[..., None, :] + (up * dwo[..., None, :]) @ kc + eps * _suffix(dwo)[..., None]
        dq[:, :, r] += I[..., None] * RB_t + du[..., None] * (K_t + eps) + RQ_t
        dk[:, :, r] = (dk_c + dr[..., None] * (B_t + eps) + O[..., None] * RA_t + RK_t
                       + dwo[..., None] * (Q_t + eps))
        R = R + qc.transpose(-1, -2) @ gdo
        RA, RB, RK, RQ = RA_t[..., 0, :], RB_t[..., 0, :], RK_t[..., 0, :], RQ_t[..., 0, :]
    mask = m_all[..., None]
    return dq * mask, dk * mask, dv * mask
