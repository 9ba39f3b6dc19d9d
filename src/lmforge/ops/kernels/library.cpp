// The operator namespace torch.ops.lmforge, which the kernels' files add to.
#include <torch/library.h>

#include "blas.h"

TORCH_LIBRARY(lmforge, m) { m.def("has_blas() -> bool", [] { return lmforge::has_blas(); }); }
