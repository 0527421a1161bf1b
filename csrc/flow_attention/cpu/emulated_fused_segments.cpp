// The causal forward's scan over segments (kernels/flow_attention/causal_segments.cuh), SIMT emulator build.
#include "flow_attention/causal_segments.cuh"
