// The layout probe's host build: the emulator's record, for comparison with a GPU's.
#include "layout_probe.cu"
