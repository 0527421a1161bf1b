// The causal Flow-Attention backward's passes in the emulator against the spec's causal recurrence in float64
// (FlowProblem::walk) on the same rounded inputs, from a first run's state (the queries pass writes the final
// state as the forward does). The queries pass (causal_query_grads.cuh): the tiles' shares of dg_t = <dout_t,
// q_t^T S_t> and of dq_t = g_t S_t dout_t (before phi'), added in tile order, the rows' scalars and K, Q, A, B at
// each chunk's start. The keys pass (causal_key_grads.cuh) after it, with a random final state's gradient: dv, the
// shares of dc_t and of dk_t = c_t R_t v_t, and the incoming state's dS. Every output poisoned with NaN first.
#pragma once

#include "flow_attention/causal_chain.cuh"
#include "flow_attention/causal_key_grads.cuh"
#include "flow_attention/causal_query_grads.cuh"
#include "flow_problem.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace flowformer::simt_tests {

template <typename T>
struct FlowQueryGradsProblem : FlowProblem<T> {
  using Base = FlowProblem<T>;
  using Base::c, Base::N;
  std::vector<T> dout;  // (N, H, L, M), NaN in padded rows (they count for nothing)

  // rising: keys scaled up along the sequence, so that later sources pass earlier maxima (the competition's
  // running maximum moves, and its rescaling counts)
  explicit FlowQueryGradsProblem(const FlowCase& fc, bool rising = false) : Base(fc) {
    if (rising) {
      for (std::size_t i = 0; i < this->k.size(); ++i) {
        const int64_t t = int64_t(i / std::size_t(c.D)) % c.L;
        this->k[i] = T(float(this->k[i]) * (0.25f + 2.f * float(t) / float(c.L)) + 1.f);
      }
    }
    const std::vector<float> x = random_floats(std::size_t(N * c.H * c.L * c.M), 35, -1.f, 1.f);
    dout.assign(x.begin(), x.end());
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t i = 0; i < c.H * c.L; ++i) {
        if (this->pad[n * c.L + i % c.L]) {
          for (int j = 0; j < c.M; ++j) {
            dout[std::size_t(((n * c.H) * c.L + i) * c.M + j)] = T(std::numeric_limits<float>::quiet_NaN());
          }
        }
      }
    }
  }

  int tiles() const { return c.M / flow_kernels::causal_value_tile(c.D, c.M, sizeof(T)); }

  // The pass over rows [first, first + length) of each sequence from `state0` (nullptr: zeros): the shares added
  // ("dq", "dg"), the rows' scalars by name, "starts" (chunk_starts) and "state" (the final states).
  std::map<std::string, std::vector<float>> run_pass(const float* state0, int64_t first, int64_t length) const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const std::size_t rows = std::size_t(N * c.H * length), tiles_ = std::size_t(tiles());
    const int64_t slots = flow_kernels::causal_chunk_slots(length, int(N), false);
    std::vector<float> dq(tiles_ * rows * std::size_t(c.D), nan), dg(tiles_ * rows, nan),
        scalars(flow_kernels::kCausalRowScalars * rows, nan), starts(std::size_t(N * c.H * slots * 4 * c.D), nan),
        state(std::size_t(N * c.H * this->layout.size()), nan);
    const std::unique_ptr<bool[]> piece = this->piece_pad(first, length);
    flow_kernels::CausalQueryGradsParams p{};
    static_cast<flow_kernels::CausalForwardParams&>(p) = this->params(first, length, piece.get(), state0, state.data());
    p.dout = dout.data() + first * c.M;
    for (int i = 0; i < 3; ++i) {
      p.dout_stride[i] = p.v_stride[i];
    }
    p.dq_parts = dq.data();
    p.dg_parts = dg.data();
    p.rows = scalars.data();
    p.chunk_starts = starts.data();
    switch (c.D) {  // the head dims the tests take (one instantiation each)
      case 16:
        flow_kernels::emulated::CausalQueryGrads<16>::run(p, nullptr);
        break;
      case 64:
        flow_kernels::emulated::CausalQueryGrads<64>::run(p, nullptr);
        break;
      default:
        throw std::invalid_argument("FlowQueryGradsProblem: D 16 or 64");
    }
    std::map<std::string, std::vector<float>> out{{"dq", add_shares(dq, rows * std::size_t(c.D))},
                                                  {"dg", add_shares(dg, rows)},
                                                  {"starts", starts},
                                                  {"state", state},
                                                  {"rows", scalars}};
    const char* names[flow_kernels::kCausalRowScalars] = {"n", "I", "O", "a", "r", "c", "g", "m", "E"};
    for (int i = 0; i < flow_kernels::kCausalRowScalars; ++i) {
      out[names[i]].assign(scalars.begin() + std::ptrdiff_t(i * rows), scalars.begin() + std::ptrdiff_t((i + 1) * rows));
    }
    return out;
  }

  // ||kernel - reference|| / ||reference|| of each output of the pass over the rows after `first`, from the state
  // a first run left (-1: a non-finite or unwritten element). The scalars a and r are compared on valid rows only
  // (the chain reads them nowhere else); m on the rows after the first valid one (before it: -inf, checked too).
  std::map<std::string, double> errors(int64_t first) const {
    const auto head = run_pass(nullptr, 0, first);
    const int64_t length = c.L - first, slots = flow_kernels::causal_chunk_slots(length, int(N), false);
    const auto pass = run_pass(head.at("state").data(), first, length);
    std::map<std::string, std::vector<float>> got;
    std::map<std::string, std::vector<double>> want;
    const auto add = [&](const std::string& name, float kernel, double reference) {
      got[name].push_back(kernel);
      want[name].push_back(reference);
    };
    bool unset_m = true;
    this->walk(c.L, [&](int64_t n, int h, int64_t t, const typename Base::Chain& x) {
      if (t < first) {
        return;
      }
      const std::size_t row = std::size_t((n * c.H + h) * length + (t - first));
      const auto at = [&](const char* name) { return pass.at(name)[row]; };
      double dg = 0;
      for (int d = 0; d < c.D; ++d) {
        double s_dout = 0;  // (S_t dout_t)_d
        for (int j = 0; j < c.M; ++j) {
          const double s = x.S[std::size_t(d) * c.M + j], dout_j = x.valid ? double(float(dout[row_of(n, h, t) * c.M + j])) : 0.0;
          s_dout += s * dout_j;
          dg += x.q[d] * s * dout_j;
        }
        add("dq", pass.at("dq")[row * std::size_t(c.D) + std::size_t(d)], x.g * s_dout);
      }
      add("dg", at("dg"), x.valid ? dg : 0.0);
      add("n", at("n"), x.n);
      add("I", at("I"), x.I);
      add("O", at("O"), x.O);
      add("c", at("c"), x.cw);
      add("g", at("g"), x.g);
      add("E", at("E"), x.E);
      if (x.valid) {
        add("a", at("a"), x.a);
        add("r", at("r"), x.r);
      }
      if (x.m == -INFINITY) {
        unset_m = unset_m && at("m") == -INFINITY;
      } else {
        add("m", at("m"), x.m);
      }
      if ((t - first) % flow_kernels::kChunkRows == 0) {
        const float* start = pass.at("starts").data() + ((n * c.H + h) * slots + (t - first) / flow_kernels::kChunkRows) * 4 * c.D;
        for (int i = 0; i < 4 * c.D; ++i) {
          add("starts", start[i], x.before[std::size_t(i)]);
        }
      }
    });
    std::map<std::string, double> error;
    for (const auto& [name, values] : got) {
      error[name] = relative_error(values, want[name]);
    }
    error["m before a valid row"] = unset_m ? 0.0 : -1.0;
    return error;
  }

  int64_t row_of(int64_t n, int h, int64_t t) const { return (n * c.H + h) * c.L + t; }

  // The keys pass over rows [first, first + length) after the queries pass there (`rows`: its records), with the
  // final state's gradient `dstate` ((N, H, size)): "dv", "dc" and "dk" (the shares added), "dS0" (the incoming
  // state's gradient, S's part).
  std::map<std::string, std::vector<float>> run_keys_pass(const std::vector<float>& records, const float* dstate,
                                                          int64_t first, int64_t length) const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const int tiles_ = c.M / chunk::backward_value_tile(c.D, c.M, sizeof(T));
    const std::size_t rows = std::size_t(N * c.H * length), size = std::size_t(this->layout.size());
    std::vector<T> dv(rows * std::size_t(c.M), T(nan));
    std::vector<float> dk(std::size_t(tiles_) * rows * std::size_t(c.D), nan), dc(std::size_t(tiles_) * rows, nan),
        dstate0(std::size_t(N * c.H) * size, nan);
    const std::unique_ptr<bool[]> piece = this->piece_pad(first, length);
    const flow_kernels::CausalForwardParams forward = this->params(first, length, piece.get(), nullptr, nullptr);
    flow_kernels::CausalKeyGradsParams p{};
    static_cast<chunk::Inputs&>(p) = forward;
    static_cast<chunk::Segments&>(p) = forward;
    p.pad = piece.get();
    p.dout = dout.data() + first * c.M;
    for (int i = 0; i < 3; ++i) {
      p.dout_stride[i] = p.v_stride[i];
    }
    p.rows = records.data();
    p.dstate_final = dstate;
    p.dv = dv.data();
    p.dk_parts = dk.data();
    p.dc_parts = dc.data();
    p.dstate0 = dstate0.data();
    switch (c.D) {
      case 16:
        flow_kernels::emulated::CausalKeyGrads<16>::run(p, nullptr);
        break;
      case 64:
        flow_kernels::emulated::CausalKeyGrads<64>::run(p, nullptr);
        break;
      default:
        throw std::invalid_argument("FlowQueryGradsProblem: D 16 or 64");
    }
    std::vector<float> dS0;
    for (std::size_t u = 0; u < std::size_t(N * c.H); ++u) {
      const auto S = dstate0.begin() + std::ptrdiff_t(u * size + std::size_t(this->layout.S()));
      dS0.insert(dS0.end(), S, S + c.D * c.M);
    }
    return {{"dv", std::vector<float>(dv.begin(), dv.end())},
            {"dc", add_shares(dc, rows)},
            {"dk", add_shares(dk, rows * std::size_t(c.D))},
            {"dS0", dS0}};
  }

  // The keys pass's errors (as errors()) over the rows after `first`, from the queries pass there.
  std::map<std::string, double> key_errors(int64_t first) const {
    const auto head = run_pass(nullptr, 0, first);
    const int64_t length = c.L - first;
    const auto queries = run_pass(head.at("state").data(), first, length);
    const std::vector<float> dstate = random_floats(std::size_t(N * c.H * this->layout.size()), 36, -1e-3f, 1e-3f);
    const auto keys = run_keys_pass(queries.at("rows"), dstate.data(), first, length);
    // The chain's rows after `first` (float64), then R = dS_L + sum_{t' >= t} g_t' q_t' dout_t'^T from the end.
    struct Row {
      bool valid;
      double g, cw;
      std::vector<double> q, k;
    };
    std::vector<std::vector<Row>> chains(std::size_t(N * c.H));
    this->walk(c.L, [&](int64_t n, int h, int64_t t, const typename Base::Chain& x) {
      if (t >= first) {
        chains[std::size_t(n * c.H + h)].push_back({x.valid, x.g, x.cw, x.q, x.k});
      }
    });
    std::map<std::string, std::vector<float>> got;
    std::map<std::string, std::vector<double>> want;
    const auto add = [&](const std::string& name, float kernel, double reference) {
      got[name].push_back(kernel);
      want[name].push_back(reference);
    };
    const std::size_t size = std::size_t(this->layout.size());
    for (std::size_t u = 0; u < chains.size(); ++u) {
      const int64_t n = int64_t(u) / c.H;
      const int h = int(int64_t(u) % c.H);
      std::vector<double> R(std::size_t(c.D * c.M));
      for (std::size_t i = 0; i < R.size(); ++i) {
        R[i] = dstate[u * size + std::size_t(this->layout.S()) + i];
      }
      for (int64_t t = length - 1; t >= 0; --t) {
        const Row& x = chains[u][std::size_t(t)];
        const int64_t source = row_of(n, h, first + t);
        const std::size_t row = u * std::size_t(length) + std::size_t(t);
        const auto value = [&](const std::vector<T>& rows, int j) {
          return x.valid ? double(float(rows[std::size_t(source * c.M + j)])) : 0.0;
        };
        for (int d = 0; d < c.D; ++d) {
          for (int j = 0; j < c.M; ++j) {
            R[std::size_t(d * c.M + j)] += x.g * x.q[std::size_t(d)] * value(dout, j);
          }
        }
        double dc = 0;
        for (int j = 0; j < c.M; ++j) {
          double dw = 0;
          for (int d = 0; d < c.D; ++d) {
            dw += R[std::size_t(d * c.M + j)] * x.k[std::size_t(d)];
          }
          add("dv", keys.at("dv")[row * std::size_t(c.M) + std::size_t(j)], x.cw * dw);
          dc += dw * value(this->v, j);
        }
        add("dc", keys.at("dc")[row], dc);
        for (int d = 0; d < c.D; ++d) {
          double Rv = 0;
          for (int j = 0; j < c.M; ++j) {
            Rv += R[std::size_t(d * c.M + j)] * value(this->v, j);
          }
          add("dk", keys.at("dk")[row * std::size_t(c.D) + std::size_t(d)], x.cw * Rv);
        }
      }
      for (std::size_t i = 0; i < R.size(); ++i) {
        add("dS0", keys.at("dS0")[u * R.size() + i], R[i]);
      }
    }
    std::map<std::string, double> error;
    for (const auto& [name, values] : got) {
      error[name] = relative_error(values, want[name]);
    }
    return error;
  }

  // The three passes over rows [first, first + length) from `state0` with the final state's gradient `dstate`:
  // "dq", "dk" (through phi'), "dv" and "dstate0" (the incoming state's gradient, S's part from the keys pass).
  std::map<std::string, std::vector<float>> run_backward(const float* state0, const std::vector<float>& dstate,
                                                         int64_t first, int64_t length) const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const auto queries = run_pass(state0, first, length);
    const auto keys = run_keys_pass(queries.at("rows"), dstate.data(), first, length);
    const std::size_t rows = std::size_t(N * c.H * length), size = std::size_t(this->layout.size());
    std::vector<T> dq(rows * std::size_t(c.D), T(nan)), dk(dq.size(), T(nan));
    std::vector<float> dstate0(std::size_t(N * c.H) * size, nan);
    const std::unique_ptr<bool[]> piece = this->piece_pad(first, length);
    const flow_kernels::CausalForwardParams forward = this->params(first, length, piece.get(), state0, nullptr);
    flow_kernels::CausalChainParams p{};
    static_cast<chunk::Inputs&>(p) = forward;
    static_cast<chunk::Segments&>(p) = forward;
    p.pad = piece.get();
    p.clamp = c.clamp;
    p.rows = queries.at("rows").data();
    p.chunk_starts = queries.at("starts").data();
    p.dg_shares = queries.at("dg").data();  // the tiles' shares added in order, as the host adds them
    p.dq_shares = queries.at("dq").data();
    p.dc_shares = keys.at("dc").data();
    p.dk_shares = keys.at("dk").data();
    p.state0 = state0;
    p.dstate_final = dstate.data();
    p.dq = dq.data();
    p.dk = dk.data();
    p.dstate0 = dstate0.data();
    switch (c.D) {
      case 16:
        flow_kernels::emulated::CausalChain<16>::run(p, nullptr);
        break;
      case 64:
        flow_kernels::emulated::CausalChain<64>::run(p, nullptr);
        break;
      default:
        throw std::invalid_argument("FlowQueryGradsProblem: D 16 or 64");
    }
    for (std::size_t u = 0; u < std::size_t(N * c.H); ++u) {  // S's part from the keys pass
      std::copy(keys.at("dS0").begin() + std::ptrdiff_t(u * std::size_t(c.D * c.M)),
                keys.at("dS0").begin() + std::ptrdiff_t((u + 1) * std::size_t(c.D * c.M)),
                dstate0.begin() + std::ptrdiff_t(u * size + std::size_t(this->layout.S())));
    }
    return {{"dq", std::vector<float>(dq.begin(), dq.end())},
            {"dk", std::vector<float>(dk.begin(), dk.end())},
            {"dv", keys.at("dv")},
            {"dstate0", dstate0}};
  }

  // ||kernel - reference|| / ||reference|| of dq, dk and the incoming state's gradients but S's (the keys pass's,
  // checked above) over the rows after `first`, the reference the chain in float64 row by row (DESIGN.md's pass 3
  // with the passes 1 and 2 it follows, made from the float64 recurrence).
  std::map<std::string, double> backward_errors(int64_t first) const {
    const auto head = first > 0 ? run_pass(nullptr, 0, first) : std::map<std::string, std::vector<float>>{};
    const int64_t length = c.L - first;
    // the final state's gradients of the size of the chunks' terms, but dm and dE's of 1
    std::vector<float> dstate = random_floats(std::size_t(N * c.H * this->layout.size()), 37, -1e-3f, 1e-3f);
    for (std::size_t u = 0; u < std::size_t(N * c.H); ++u) {
      dstate[u * std::size_t(this->layout.size()) + std::size_t(this->layout.m())] *= 1e3f;
      dstate[u * std::size_t(this->layout.size()) + std::size_t(this->layout.E())] *= 1e3f;
    }
    const auto kernel = run_backward(first > 0 ? head.at("state").data() : nullptr, dstate, first, length);
    struct Row {
      bool valid;
      double n, I, O, a, r, cw, g, m, E, dg;
      std::vector<double> q, k, K, Q, A, B, dq_S;
      int64_t source;  // the row in the inputs
    };
    std::vector<std::vector<Row>> chains(std::size_t(N * c.H));
    std::vector<std::array<double, 3>> incoming(chains.size(), {0.0, -INFINITY, 0.0});  // n, m, E before `first`
    this->walk(c.L, [&](int64_t n, int h, int64_t t, const typename Base::Chain& x) {
      const std::size_t u = std::size_t(n * c.H + h);
      if (t == first - 1) {
        incoming[u] = {x.n, x.m, x.E};
      }
      if (t < first) {
        return;
      }
      Row row{x.valid, x.n, x.I, x.O, x.a, x.r, x.cw, x.g, x.m, x.E, 0.0, x.q, x.k, x.K, x.Q, x.A, x.B,
              std::vector<double>(std::size_t(c.D)), row_of(n, h, t)};
      for (int j = 0; j < c.M && x.valid; ++j) {
        const double dout_j = double(float(dout[std::size_t(row.source * c.M + j)]));
        for (int d = 0; d < c.D; ++d) {
          const double s = x.S[std::size_t(d) * c.M + j];
          row.dg += x.q[std::size_t(d)] * s * dout_j;
          row.dq_S[std::size_t(d)] += x.g * s * dout_j;
        }
      }
      chains[u].push_back(row);
    });
    std::map<std::string, std::vector<float>> got;
    std::map<std::string, std::vector<double>> want;
    const auto add = [&](const std::string& name, float kernel_value, double reference) {
      got[name].push_back(kernel_value);
      want[name].push_back(reference);
    };
    const std::size_t size = std::size_t(this->layout.size());
    const double e = c.eps;
    for (std::size_t u = 0; u < chains.size(); ++u) {
      const std::vector<Row>& rows = chains[u];
      const float* fin = dstate.data() + u * size;
      const auto seed = [&](int64_t at) {
        return std::vector<double>(fin + at, fin + at + c.D);
      };
      std::vector<double> RA = seed(this->layout.A()), RB = seed(this->layout.B()), RK = seed(this->layout.K()),
                          RQ = seed(this->layout.Q());
      // pass 2 in float64: dc_t and dk_c = c_t R_t v_t
      std::vector<double> R(std::size_t(c.D * c.M)), dc(rows.size()), dk_c(rows.size() * std::size_t(c.D));
      for (std::size_t i = 0; i < R.size(); ++i) {
        R[i] = fin[std::size_t(this->layout.S()) + i];
      }
      for (std::size_t t = rows.size(); t-- > 0;) {
        const Row& x = rows[t];
        if (!x.valid) {
          continue;
        }
        const auto value = [&](const std::vector<T>& m, int j) { return double(float(m[std::size_t(x.source * c.M + j)])); };
        for (int d = 0; d < c.D; ++d) {
          for (int j = 0; j < c.M; ++j) {
            R[std::size_t(d * c.M + j)] += x.g * x.q[std::size_t(d)] * value(dout, j);
          }
        }
        for (int j = 0; j < c.M; ++j) {
          double dw = 0;
          for (int d = 0; d < c.D; ++d) {
            dw += R[std::size_t(d * c.M + j)] * x.k[std::size_t(d)];
          }
          dc[t] += dw * value(this->v, j);
        }
        for (int d = 0; d < c.D; ++d) {
          for (int j = 0; j < c.M; ++j) {
            dk_c[t * std::size_t(c.D) + std::size_t(d)] += x.cw * R[std::size_t(d * c.M + j)] * value(this->v, j);
          }
        }
      }
      // pass 3: the chain
      const auto [n0, m0, E0] = incoming[u];
      const Row& final_row = rows.back();
      const bool started = final_row.n > 0;
      const double dm = fin[this->layout.m()], dE = fin[this->layout.E()];
      const double d_lse = started ? dE * final_row.E : 0.0, dm_source = (started ? dm : 0.0) - d_lse;
      double P = started ? -d_lse / final_row.E : 0.0, m_next = final_row.m;
      const bool from_source = final_row.m > m0;
      std::size_t source = rows.size();
      for (std::size_t t = 0; t < rows.size() && from_source; ++t) {
        if (rows[t].m == final_row.m) {
          source = t;
          break;
        }
      }
      std::vector<std::vector<double>> dq(rows.size()), dk(rows.size());
      for (std::size_t t = rows.size(); t-- > 0;) {
        const Row& x = rows[t];
        dq[t].assign(std::size_t(c.D), 0.0);
        dk[t].assign(std::size_t(c.D), 0.0);
        if (!x.valid) {
          continue;
        }
        const double xc = dc[t] * x.cw;
        P = xc / x.E + std::exp(x.m - m_next) * P;
        m_next = x.m;
        const double source_grad = xc - x.cw * x.E * P / x.n + (t == source ? dm_source : 0.0);
        const double dr = std::abs(x.r) <= double(c.clamp) ? source_grad / x.n : 0.0;
        const double dsink = x.dg * x.I * x.a * (1 - x.a) / (x.n * x.n);
        double qRB = 0, kRA = 0;
        for (int d = 0; d < c.D; ++d) {
          RB[std::size_t(d)] += dr * (x.k[std::size_t(d)] + e);
          RA[std::size_t(d)] += dsink * (x.q[std::size_t(d)] + e);
          qRB += RB[std::size_t(d)] * x.q[std::size_t(d)];
          kRA += RA[std::size_t(d)] * x.k[std::size_t(d)];
        }
        const double dI = x.dg * x.a / x.n + qRB, dO = kRA;
        const double du = -dI * x.I * x.I / x.n, dy = -dO * x.O * x.O / x.n;
        for (int d = 0; d < c.D; ++d) {
          const std::size_t i = std::size_t(d);
          RK[i] += du * (x.q[i] + e);
          RQ[i] += dy * (x.k[i] + e);
          dq[t][i] = x.dq_S[i] + dsink * (x.A[i] + e) + x.I * RB[i] + du * (x.K[i] + e) + RQ[i];
          dk[t][i] = dk_c[t * std::size_t(c.D) + i] + dr * (x.B[i] + e) + x.O * RA[i] + RK[i] + dy * (x.Q[i] + e);
        }
      }
      for (std::size_t t = 0; t < rows.size(); ++t) {
        const Row& x = rows[t];
        const std::size_t at = (u * std::size_t(length) + t) * std::size_t(c.D);
        for (int d = 0; d < c.D; ++d) {
          const std::size_t i = std::size_t(d);
          const double raw_q = double(float(this->q[std::size_t(x.source * c.D) + i]));
          const double raw_k = double(float(this->k[std::size_t(x.source * c.D) + i]));
          add("dq", kernel.at("dq")[at + i], dq[t][i] * phi_derivative(c.feature_map, raw_q));
          add("dk", kernel.at("dk")[at + i], dk[t][i] * phi_derivative(c.feature_map, raw_k));
        }
      }
      const float* d0 = kernel.at("dstate0").data() + u * size;
      const bool started0 = E0 > 0;
      const double d_lse0 = started0 ? -E0 * std::exp(m0 - m_next) * P : 0.0;
      add("dn0", d0[this->layout.n()], 0.0);
      add("dm0", d0[this->layout.m()], d_lse0 + (started0 && !from_source ? dm_source : 0.0));
      add("dE0", d0[this->layout.E()], started0 ? d_lse0 / E0 : 0.0);
      for (int d = 0; d < c.D; ++d) {
        const std::size_t i = std::size_t(d);
        add("dK0", d0[this->layout.K() + d], RK[i]);
        add("dQ0", d0[this->layout.Q() + d], RQ[i]);
        add("dA0", d0[this->layout.A() + d], RA[i]);
        add("dB0", d0[this->layout.B() + d], RB[i]);
      }
      (void)n0;
    }
    std::map<std::string, double> error;
    for (const auto& [name, values] : got) {
      // exact zeros where the reference is all zeros (dn0 always; dm0 and dE0 without an incoming state)
      const bool zeros = std::all_of(want[name].begin(), want[name].end(), [](double x) { return x == 0.0; });
      error[name] = zeros ? (std::all_of(values.begin(), values.end(), [](float x) { return x == 0.f; }) ? 0.0 : -1.0)
                          : relative_error(values, want[name]);
    }
    return error;
  }
};

}  // namespace flowformer::simt_tests
