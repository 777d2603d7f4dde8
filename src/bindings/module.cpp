// nvclip_fast._C: the private extension module. Users import nvclip_fast, never this.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "nvclip_fast native core (private; use the nvclip_fast package)";
  nvclip::bind_errors(m);
  nvclip::bind_build_info(m);
  nvclip::bind_engine(m);
  nvclip::bind_batch_queue(m);
  nvclip::bind_resize_normalize(m);
  nvclip::bind_testing(m);
}
