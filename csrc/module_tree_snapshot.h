// A snapshot of an nn.Module tree's parameter registrations, for LocalSGD's per-sync question "would
// model.parameters() still return the same list?", answered in compiled code.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace localsgd_ext {

// model.parameters() is a function of every module's `_parameters` and `_modules` dicts, and
// model.buffers() of `_buffers` and `_modules`. The snapshot keeps, for each module of the tree, those
// three dicts and the identity and order of their values;
// unchanged() compares them again. A parameter replaced (`module.weight = nn.Parameter(...)`,
// `load_state_dict(assign=True)`, a write to `module._parameters`), added, removed, or a module
// added, removed or replaced anywhere in the tree all show. It holds references to everything it
// records, so no id can be reused while it lives.
// Hidden like pybind11's own namespace, whose object types it holds (else GCC warns with -fvisibility).
#if defined(__GNUC__)
#define LOCALSGD_EXT_HIDDEN __attribute__((visibility("hidden")))
#else
#define LOCALSGD_EXT_HIDDEN
#endif

class LOCALSGD_EXT_HIDDEN ModuleTreeSnapshot {
 public:
  // `modules`: every module of the tree, as `model.modules()` lists them.
  explicit ModuleTreeSnapshot(const pybind11::list& modules);
  bool unchanged() const;

 private:
  struct DictRecord {
    pybind11::object owner_dict; // the module's __dict__
    pybind11::object attribute;  // interned "_parameters", "_buffers" or "_modules"
    pybind11::object dict;
    std::vector<pybind11::object> values;
  };
  std::vector<DictRecord> records_;
};

void bind_module_tree_snapshot(pybind11::module_& m);

} // namespace localsgd_ext
