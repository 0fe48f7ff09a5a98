// Placeholder: the momentum op family registers its CPU entry points here.
#include "register_ops.h"

namespace fastcontrast {

void register_momentum_ops(pybind11::module_& m) { (void)m; }

}  // namespace fastcontrast
