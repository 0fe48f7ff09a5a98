// Placeholder: the siglip op family registers its CPU entry points here.
#include "register_ops.h"

namespace fastcontrast {

void register_siglip_ops(pybind11::module_& m) { (void)m; }

}  // namespace fastcontrast
