// The flowformer C++ API: one function per op, each calling the registered op through the dispatcher.
#pragma once

#include <flowformer/build_info.h>
#include <flowformer/flow_attention.h>
#include <flowformer/linear_attention.h>
#include <flowformer/aft.h>
#include <flowformer/nn.h>
