// The chunked kernel layer, shared by the kernel families that walk sequences in chunks (linear attention,
// Flow-Attention), as types:
//   ChunkTile<T, W>    64 rows x W columns of T (16-bit, or float) in shared memory, loaded by cp.async
//   RowTile<N>         a warp's 16 rows x N columns of float accumulators (m16n8 tiles)
//   Scores<Lower>      a warp's rows of the chunk's 64 x 64 score matrix, one side of the diagonal
//   StateTile<T, R, C> an R x C float matrix in registers spread over the warps (16 x 16 units), that adds x^T y
//                      over a chunk and publishes itself as 16-bit parts (half: hi + lo; bf16: hi; float: itself)
//   Fragment<T>        an operand of the m16n8k16 layout: 4 registers of 16-bit pairs, or 8 floats
// with the stages that move them: load_rows, apply_feature_map, scale_rows_into_unit, walk_chunks, store_rows
// (and a backward's gradient rows, GradientRows);
// where a block works (BlockPlace, from a call's Inputs and Segments) and the launch of a grid of value tiles.
// Products are mma.m16n8k16 with float accumulators, operands by ldmatrix from shared memory; float32 inputs
// multiply as three tf32 products per k8 half (mma_3xtf32), operands by plain loads. Namespace
// flowformer::chunk::cuda (nvcc) or ::emulated (the SIMT emulator), as simt/simt.h's FF_SIMT_BUILD.
#pragma once

#include "chunk/block_place.cuh"
#include "chunk/gradient_rows.cuh"
#include "chunk/fragments.cuh"
#include "chunk/row_ops.cuh"
#include "chunk/row_tile.cuh"
#include "chunk/sequence.cuh"
#include "chunk/shape.h"
#include "chunk/shared_tiles.cuh"
#include "chunk/state_tile.cuh"
