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


def unpack_state(state, D, M):
    """The ChunkState of the op's packed state (B, H, 3 + 4 D + D M): [n, m, E, K, Q, A, B, S]; E = 0: no
    competition yet (m counts for nothing)."""
    st = ChunkState(*state.shape[:2], D, M, dtype=state.dtype, device=state.device)
    started = state[..., 2] > 0
    st.n = state[..., 0]
    st.m = torch.where(started, state[..., 1], float("-inf"))
    st.E = torch.where(started, state[..., 2], 0)
    st.K, st.Q, st.A, st.B = (state[..., 3 + i * D:3 + (i + 1) * D] for i in range(4))
    st.S = state[..., 3 + 4 * D:].unflatten(-1, (D, M))
    return st


def causal_chunks(q, k, v, valid, *, eps, clamp, chunk, state=None):
    """Walks the chunks in order: yields (rows, the chunk's inputs, its per-row quantities, the state at its start)
    and then moves the state past the chunk. Features q, k (B, H, L, D), v (B, H, L, M), valid (B, L); state: the
    ChunkState before the first row (None: empty)."""
    B, H, L, D = q.shape
    f = dict(dtype=q.dtype, device=q.device)
    m_all = valid[:, None, :].to(q.dtype).expand(B, H, L)  # (B, H, L)
    q, k = q * m_all[..., None], k * m_all[..., None]  # padded rows contribute nothing
    st = ChunkState(B, H, D, v.shape[-1], **f) if state is None else state
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


def split_chain(pieces, per_segment, walk, fin_carry):
    """The chain's split schedule: its carries after each segment, made by levels of sums (each a walk of every
    segment, then a scan of the segments in reverse), then the chain over every segment from its carries (dq, dk
    written by walk); returns the carries before the first segment.
      1. P: each segment from no P after it (P = 0, no m), giving P and m at its first valid row (P_g, m_g); the
         scan composes them as affine maps: P before g = P_g + exp(m_g - m after g) P after g.
      2. RA, RB: each segment from its exact P and m after it, RA = RB = 0: the segment's sums of dsink (q + e) and
         dr (k + e) (dr, dsink are then final); the scan adds the later segments' sums to the final state's dA, dB.
      3. RK, RQ: from the exact P, RA, RB, RK = RQ = 0: the sums of du (q + e) and dy (k + e) (dI, dO then final).
      4. every segment from its whole carries: dq, dk.
    The walks of levels 1-3 write dq, dk too; level 4's overwrite them."""
    segments = [pieces[i:i + per_segment] for i in range(0, len(pieces), per_segment)]
    zero = torch.zeros_like(fin_carry[2])
    # 1. P
    P, m_next = fin_carry[0], fin_carry[1]
    after = [None] * len(segments)
    for g in reversed(range(len(segments))):
        after[g] = (P, m_next)
        P_g, m_g = walk(segments[g], (torch.zeros_like(P), None, zero, zero, zero, zero))[:2]
        seen = ~torch.isnan(m_g)  # a valid row in the segment
        P = torch.where(seen, P_g + torch.exp(torch.where(seen, m_g, 0) - m_next) * P, P)
        m_next = torch.where(seen, m_g, m_next)
    P_0, m_0 = P, m_next
    # 2. RA, RB, then 3. RK, RQ: sums over each segment, scanned in reverse from the final state's
    RA, RB, RK, RQ = (list(x for _ in segments) for x in fin_carry[2:])
    for level in (0, 1):
        total = list(fin_carry[2 + 2 * level:4 + 2 * level])
        for g in reversed(range(len(segments))):
            carry = [*after[g], RA[g], RB[g], RK[g], RQ[g]]
            carry[2 + 2 * level:4 + 2 * level] = [zero, zero]
            if level == 0:
                RA[g], RB[g] = total
            else:
                RK[g], RQ[g] = total
            sums = walk(segments[g], carry)[2 + 2 * level:4 + 2 * level]
            total = [t + s for t, s in zip(total, sums)]
        if level == 0:
            RA_0, RB_0 = total
        else:
            RK_0, RQ_0 = total
    # 4. the gradients
    for g in range(len(segments)):
        walk(segments[g], (*after[g], RA[g], RB[g], RK[g], RQ[g]))
    return P_0, m_0, RA_0, RB_0, RK_0, RQ_0


def causal_flow_chunked_backward(q, k, v, valid, dout, *, eps, clamp, chunk, tile=None, state=None,
                                 grad_state=None, segment=None):
    """The gradients of causal Flow-Attention (dq, dk with respect to the features q, k; dv; and the incoming packed
    state's, None without one) as the fused kernels make them, over chunks of `chunk` rows and value tiles of `tile`
    columns (None: one), given those of the output (dout) and of the final state (grad_state, None: zeros):
      1. queries, in order, one block a value tile: the forward recomputed from the incoming state; the tile's
         shares of dg_t = <dout_t, q_t^T S_t> and of g_t S_t dout_t (S_t dout_t = S0 dout_t + sum_{j<=t} k_j c_j
         <v_j, dout_t>: the masked dout v^T with its columns scaled by c, times k); per-row scalars and the vectors
         K, Q, A, B at each chunk's start (tile 0); the largest source and its row (the final state's m).
      2. keys, in reverse, one block a value tile, carrying the tile's columns of R = dS_L + sum g q dout^T: dv,
         and the shares of dc_t = <R_t^T k_t, v_t> and of c_t R_t v_t; R at the start is dS_0.
      3. the chain, in reverse, one block a (sequence, head), no value columns: dsink from dg; the competition's
         P_t = dc_t c_t / E_t + exp(m_t - m_next) P_next (seeded by the final state's d lse = dE E_L as a term
         -d lse / E_L after the last row), dr; the reverse sums RA, RB, RK, RQ of (q + e), (k + e) weighted by
         dsink, dr, du, dy (seeded by the final state's dA, dB, dK, dQ) with dI, du, dO, dy; dq, dk from the
         shares and the forward prefixes A_t, K_t (queries), B_t, Q_t (keys); the incoming state's gradients.
    With one value tile, 2 and 3 are one pass (dc is whole in the block). segment (a multiple of chunk, or None):
    the chain's split schedule over segments of that many rows (split_chain)."""
    B_, H, L, D = q.shape
    M = v.shape[-1]
    f = dict(dtype=q.dtype, device=q.device)
    tiles = [slice(s, s + (tile or M)) for s in range(0, M, tile or M)]
    m_all = valid[:, None, :].to(q.dtype).expand(B_, H, L)
    q, k = q * m_all[..., None], k * m_all[..., None]
    st0 = unpack_state(state, D, M) if state is not None else ChunkState(B_, H, D, M, **f)
    fin = unpack_state(grad_state, D, M) if grad_state is not None else ChunkState(B_, H, D, M, **f)
    if grad_state is not None:  # the gradients of the final state's m and E as they are (not "started" ones)
        fin.m, fin.E = grad_state[..., 1], grad_state[..., 2]
    else:
        fin.m = torch.zeros_like(fin.E)
    names = ("n", "I", "O", "a", "rr", "c", "g", "m", "E")
    rows = {name: torch.zeros(B_, H, L, **f) for name in names}
    chunks, starts = [], []  # each chunk's rows, and (K0, Q0, A0, B0) at its start
    dg, dq_S = torch.zeros(B_, H, L, **f), torch.zeros_like(q)
    # 1. queries, in order
    for r, (qc, kc, vc, _), x, st in causal_chunks(q, k, v, valid, eps=eps, clamp=clamp, chunk=chunk, state=st0):
        tri, c, g = x["tri"], x["c"][..., None], x["g"][..., None]
        for cols in tiles:  # each value tile's block adds its shares
            do, vt, S0 = dout[:, :, r, cols], vc[..., cols], st.S[..., cols]
            dg[:, :, r] += (do * (x["G"] @ (vt * c) + qc @ S0)).sum(-1)
            masked_dv = (do @ vt.transpose(-1, -2)) * tri * c.transpose(-1, -2)  # [t, j]: <dout_t, v_j> c_j
            dq_S[:, :, r] += g * (do @ S0.transpose(-1, -2) + masked_dv @ kc)
        for name in names:
            rows[name][:, :, r] = x[name]
        chunks.append(r)
        starts.append((st.K, st.Q, st.A, st.B))
    valid_rows = m_all > 0
    sources = torch.where(valid_rows, rows["rr"].clamp(-clamp, clamp), float("-inf"))
    largest = sources.max(-1, keepdim=True).values
    at_largest = torch.argmax((sources == largest).to(torch.int8), -1, keepdim=True)  # its first row
    # 2. keys, in reverse, a value tile at a time
    dk_c, dv, dc = torch.zeros_like(k), torch.zeros_like(v), torch.zeros(B_, H, L, **f)
    dS0 = torch.zeros(B_, H, D, M, **f)
    for cols in tiles:
        R = fin.S[..., cols]
        for r in reversed(chunks):
            qc, kc, vt = q[:, :, r], k[:, :, r], v[:, :, r, cols]
            c, g = rows["c"][:, :, r, None], rows["g"][:, :, r, None]
            up = torch.ones(qc.shape[2], qc.shape[2], **f).triu()  # [t, t']: t' >= t
            gdo = dout[:, :, r, cols] * g
            dw = kc @ R + ((kc @ qc.transpose(-1, -2)) * up) @ gdo  # R_t^T k_t, R_t = R + sum_{t' >= t} g q dout^T
            dv[:, :, r, cols] = c * dw
            dc[:, :, r] += (dw * vt).sum(-1)
            dk_c[:, :, r] += c * (vt @ R.transpose(-1, -2) + ((vt @ gdo.transpose(-1, -2)) * up) @ qc)
            R = R + qc.transpose(-1, -2) @ gdo
        dS0[..., cols] = R
    # 3. the chain, in reverse
    n_L, m_L, E_L = rows["n"][..., -1], rows["m"][..., -1], rows["E"][..., -1]
    started_L = (st0.n + m_all.sum(-1)) > 0
    d_lse_L = torch.where(started_L, fin.E * E_L, 0)  # E_L = exp(lse_L - m_L)
    dm_L = torch.where(started_L, fin.m, 0) - d_lse_L
    P_L = torch.where(started_L, -d_lse_L / E_L.clamp(min=torch.finfo(q.dtype).tiny), 0)
    m_from_source = largest[..., 0] > st0.m  # the final m is a source's (always, without a state)
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)

    def chain_chunk(r, start, P, m_next, RA, RB, RK, RQ):
        """The chain over chunk r from the carries after it: the carries before it (P, m_next, RA, RB, RK, RQ) and
        the chunk's dq, dk. m_next None (or NaN): no P after the chunk (a segment's first walk; m_next stays NaN
        until a valid row)."""
        K0, Q0, A0, B0 = start
        qc, kc, m = q[:, :, r], k[:, :, r], m_all[:, :, r]
        T = qc.shape[2]
        tri = torch.ones(T, T, **f).tril()
        up = tri.T
        n, I, O, a, rr, c, g, mm, E = (rows[name][:, :, r] for name in names)
        dgc = dg[:, :, r]
        dsink = torch.where(m > 0, dgc * I / n * a * (1 - a) / n, 0)
        x = dc[:, :, r] * c
        Pt = torch.zeros_like(n)
        m_next = torch.full_like(P, torch.nan) if m_next is None else m_next
        for t in reversed(range(T)):  # an affine scan in a kernel (factors exp(m_t - m_next) <= 1)
            valid_t = m[..., t] > 0
            none = torch.isnan(m_next)  # no P after it yet
            later = torch.where(none, 0, torch.exp(mm[..., t] - torch.where(none, 0, m_next)) * P)
            P = torch.where(valid_t, x[..., t] / E[..., t] + later, P)
            m_next = torch.where(valid_t, mm[..., t], m_next)
            Pt[..., t] = P
        dsource = x - c * E / n * Pt
        rows_here = torch.arange(r.start, r.start + T, device=q.device)
        one_hot = (rows_here == at_largest) & m_from_source[..., None]
        dsource = dsource + torch.where(one_hot, dm_L[..., None], 0)  # the largest source carries the final m
        dr = torch.where((rr.abs() <= clamp) & (m > 0), dsource / n, 0)
        RB_t = RB[..., None, :] + (up * dr[..., None, :]) @ kc + eps * _suffix(dr)[..., None]
        dI = (dgc * a / n + (RB_t * qc).sum(-1)) * m
        RA_t = RA[..., None, :] + (up * dsink[..., None, :]) @ qc + eps * _suffix(dsink)[..., None]
        dO = (RA_t * kc).sum(-1) * m
        du = -dI * I * I / n
        dy = -dO * O * O / n
        RK_t = RK[..., None, :] + (up * du[..., None, :]) @ qc + eps * _suffix(du)[..., None]
        RQ_t = RQ[..., None, :] + (up * dy[..., None, :]) @ kc + eps * _suffix(dy)[..., None]
        A_t = A0[..., None, :] + (tri * O[..., None, :]) @ kc
        K_t = K0[..., None, :] + tri @ kc
        B_t = B0[..., None, :] + (tri * I[..., None, :]) @ qc
        Q_t = Q0[..., None, :] + tri @ qc
        dq_r = (dq_S[:, :, r] + dsink[..., None] * (A_t + eps) + I[..., None] * RB_t + du[..., None] * (K_t + eps)
                + RQ_t)
        dk_r = (dk_c[:, :, r] + dr[..., None] * (B_t + eps) + O[..., None] * RA_t + RK_t
                + dy[..., None] * (Q_t + eps))
        return (P, m_next, RA_t[..., 0, :], RB_t[..., 0, :], RK_t[..., 0, :], RQ_t[..., 0, :]), dq_r, dk_r

    def walk(pieces, carry):
        """The chain over `pieces` (chunks and their starts, in order) in reverse from `carry`: the carry before
        them; dq, dk written."""
        for r, start in reversed(pieces):
            carry, dq[:, :, r], dk[:, :, r] = chain_chunk(r, start, *carry)
        return carry

    pieces = list(zip(chunks, starts))
    fin_carry = (P_L, m_L, fin.A, fin.B, fin.K, fin.Q)
    if segment is None:
        P, m_next, RA, RB, RK, RQ = walk(pieces, fin_carry)
    else:
        P, m_next, RA, RB, RK, RQ = split_chain(pieces, segment // chunk, walk, fin_carry)
    mask = m_all[..., None]
    if state is None:
        return dq * mask, dk * mask, dv * mask, None
    # The incoming state: its sums' gradients are the reverse sums at the start; lse_0 = m_0 + log E_0 (when started)
    # enters every c_t's normaliser (d lse_0 = -E_0 exp(m_0 - m_next) P at the first valid row, the final state's
    # d lse included), and m_0 is the final m where no source passes it.
    started = st0.E > 0
    d_lse_0 = torch.where(started, -st0.E * torch.exp(st0.m - m_next) * P, 0)
    dm_0 = torch.where(started & ~m_from_source, dm_L, 0)
    dstate = torch.cat([torch.zeros_like(st0.n)[..., None], (d_lse_0 + dm_0)[..., None],
                        torch.where(started, d_lse_0 / st0.E.clamp(min=torch.finfo(q.dtype).tiny), 0)[..., None],
                        RK, RQ, RA, RB, dS0.flatten(-2)], -1)
    return dq * mask, dk * mask, dv * mask, dstate
