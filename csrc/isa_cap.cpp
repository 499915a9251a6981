// _set_isa_cap(cap) -> previous cap: caps the ISA of the CPU clones (2 = AVX-512, 1 = AVX2,
// 0 = baseline), so that the tests run every clone on one machine (cpu/cpu_isa.h).

#include "message_common.h"
#include "cpu/cpu_isa.h"

namespace scn_fast::message {
namespace {

int64_t set_isa_cap(int64_t cap) {
  TORCH_CHECK(cap >= 0 && cap <= 2, "scn_fast_ext: ISA cap must be 0, 1 or 2, got ", cap);
  return scn_fast::cpu::isa_cap.exchange(static_cast<int>(cap));
}

}  // namespace
}  // namespace scn_fast::message

TORCH_LIBRARY_FRAGMENT(scn_fast_ext, m) {
  m.def("_set_isa_cap(int cap) -> int");
}

TORCH_LIBRARY_IMPL(scn_fast_ext, CatchAll, m) {
  m.impl("_set_isa_cap", &scn_fast::message::set_isa_cap);
}
