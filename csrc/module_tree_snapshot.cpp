// ModuleTreeSnapshot: record a module tree's registrations, and compare them again.
#include "module_tree_snapshot.h"

namespace py = pybind11;

namespace localsgd_ext {
namespace {

constexpr const char* kRecordedDicts[] = {"_parameters", "_buffers", "_modules"};

std::vector<py::object> dict_values(PyObject* dict) {
  std::vector<py::object> values;
  values.reserve(static_cast<size_t>(PyDict_Size(dict)));
  Py_ssize_t position = 0;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  while (PyDict_Next(dict, &position, &key, &value)) {
    values.push_back(py::reinterpret_borrow<py::object>(value));
  }
  return values;
}

} // namespace

ModuleTreeSnapshot::ModuleTreeSnapshot(const py::list& modules) {
  for (const py::handle module : modules) {
    py::object owner_dict = module.attr("__dict__");
    for (const char* name : kRecordedDicts) {
      py::object attribute = py::reinterpret_steal<py::object>(PyUnicode_InternFromString(name));
      PyObject* dict = PyDict_Check(owner_dict.ptr()) ? PyDict_GetItem(owner_dict.ptr(), attribute.ptr()) : nullptr;
      if (dict == nullptr || !PyDict_Check(dict)) {
        throw py::type_error(std::string("modules must be torch.nn.Module objects, each with a dict ") + name +
                             " in its __dict__; got " + std::string(py::str(py::type::of(module).attr("__name__"))));
      }
      records_.push_back(
          {owner_dict, std::move(attribute), py::reinterpret_borrow<py::object>(dict), dict_values(dict)});
    }
  }
}

bool ModuleTreeSnapshot::unchanged() const {
  for (const DictRecord& record : records_) {
    // The dict itself may have been swapped (`module._parameters = {...}`). A borrowed lookup in the
    // module's __dict__: nn.Module keeps these there, and it costs no attribute protocol.
    if (PyDict_GetItem(record.owner_dict.ptr(), record.attribute.ptr()) != record.dict.ptr() ||
        PyDict_Size(record.dict.ptr()) != static_cast<Py_ssize_t>(record.values.size())) {
      return false;
    }
    Py_ssize_t position = 0;
    PyObject* key = nullptr;
    PyObject* value = nullptr;
    size_t k = 0;
    while (PyDict_Next(record.dict.ptr(), &position, &key, &value)) {
      if (value != record.values[k++].ptr()) {
        return false;
      }
    }
  }
  return true;
}

void bind_module_tree_snapshot(py::module_& m) {
  py::class_<ModuleTreeSnapshot>(m, "ModuleTreeSnapshot")
      .def(py::init<const py::list&>(), py::arg("modules"))
      .def("unchanged", &ModuleTreeSnapshot::unchanged);
}

} // namespace localsgd_ext
