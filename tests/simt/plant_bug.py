"""Writes a copy of a kernel source with one planted bug: plant_bug.py BUG SOURCE DESTINATION. Each bug replaces
one exact piece of the source; a piece that is not found fails (so that a planted test cannot quietly stop
planting anything when the kernel changes)."""

import sys
from pathlib import Path

BUGS = {  # name -> (what the kernel has, the bug)
    # I_t's denominator without e s(q_t)
    "dropped_eps": ("I[i] = ok[i] ? n[i] / (qK + g_sum[i] + e * sq[i] + ", "I[i] = ok[i] ? n[i] / (qK + g_sum[i] + "),
    # the sums up to a row take in the warp's own total as well as the earlier warps'
    "wrong_prefix": ("if (w < l.warp) {", "if (w <= l.warp) {"),
    # the competition's running sum not rescaled to a new maximum (blocks.cuh: the causal forward's, and its scan's)
    "competition_not_rescaled": ("return {top, E * exp(m - top) + next.E * exp(next.m - top)};",
                                 "return {top, E + next.E * exp(next.m - top)};"),
    # the keys' sums W not rescaled to a new maximum (non-causal pass 3)
    "keys_not_rescaled": ("W.for_all(l, [&](float& x) { x *= f; });", ""),
    # the allocation without its factor L / S (non-causal pass 4)
    "allocation_dropped": ("FeatureExp<T>{}(-conserved * allocation)", "FeatureExp<T>{}(-conserved)"),
    # the backward's dr_j without the softmax's total <dW, W> / S (non-causal backward, keys)
    "softmax_total_dropped": ("(dr[i] - (this->first_tile() ? total : 0.f))", "dr[i]"),
    # dk without dK, the gradient of the queries' normaliser's sum of keys (non-causal backward, keys 2)
    "dK_dropped": ("terms[kdK][i] = this->first_tile() ? 1.f : 0.f;", "terms[kdK][i] = 0.f;"),
    # dq's share without S_0 dout_t, the state's part (causal backward, queries)
    "query_state_dropped": ("      Block::State::template rows_times<false>(l, dout_rows, b.s_hi(), b.s_lo(), P, d0);\n", ""),
    # dw_t without R^T k_t, the part of the rows after the chunk (causal backward, keys)
    "key_state_dropped": ("    State::template rows_times<true>(l, kt, r_hi(), r_lo(), dw);\n", ""),
    # the final state's dm not carried by the largest source (causal backward, the chain)
    "source_dm_dropped": ("          source += dm_source;\n", ""),
}


def main():
    bug, source, destination = sys.argv[1:]
    text = Path(source).read_text()
    correct, planted = BUGS[bug]
    if text.count(correct) != 1:
        sys.exit(f"plant_bug.py: {bug}: {correct!r} is not in {source} exactly once")
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    Path(destination).write_text(text.replace(correct, planted))


if __name__ == "__main__":
    main()
