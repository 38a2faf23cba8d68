// Python bindings for localsgd_ext._C. The operators (pack_into, unpack_from) register themselves
// with the dispatcher when this library loads; this file only exposes the engine and the planner.
#include <torch/extension.h>

#include "agreement.h"
#include "averager.h"
#include "bucket_plan.h"
#include "fingerprint.h"
#include "interruptible_wait.h"
#include "module_tree_snapshot.h"
#include "pack_unpack_generic.h"

namespace py = pybind11;
using localsgd_ext::Bucket;
using localsgd_ext::BucketedAverager;
using localsgd_ext::PlanInput;

namespace {

py::dict bucket_to_dict(const Bucket& bucket) {
  py::dict d;
  d["group"] = bucket.group;
  d["element_size"] = bucket.element_size;
  d["numel"] = bucket.numel;
  d["tensor_indices"] = bucket.tensor_indices;
  d["offsets"] = bucket.offsets;
  return d;
}

py::list buckets_to_list(const std::vector<Bucket>& buckets) {
  py::list out;
  for (const Bucket& bucket : buckets) {
    out.append(bucket_to_dict(bucket));
  }
  return out;
}

} // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled core of localsgd_ext: bucket planner and bucketed parameter averaging engine.";
  m.attr("BUCKET_ALIGNMENT_BYTES") = localsgd_ext::kBucketAlignmentBytes;
#ifdef LOCALSGD_EXT_WITH_CUDA
  // The fused CUDA kernels (csrc/cuda/) are registered; without them CUDA uses the generic kernels.
  m.attr("CUDA_KERNELS_BUILT") = true;
#else
  m.attr("CUDA_KERNELS_BUILT") = false;
#endif

  m.def(
      "plan_buckets",
      [](const std::vector<std::tuple<int64_t, int64_t, int64_t>>& inputs, int64_t cap_bytes, int64_t alignment_bytes) {
        std::vector<PlanInput> plan_inputs;
        plan_inputs.reserve(inputs.size());
        for (const auto& [group, numel, element_size] : inputs) {
          plan_inputs.push_back({group, numel, element_size});
        }
        return buckets_to_list(localsgd_ext::plan_buckets(plan_inputs, cap_bytes, alignment_bytes));
      },
      py::arg("inputs"), py::arg("cap_bytes"), py::arg("alignment_bytes"),
      "Plans buckets over (group, numel, element_size) triples; returns one dict per bucket.");

  // The device-generic kernels, reachable on CPU only through these (CPU dispatches to its own).
  m.def(
      "_pack_into_generic",
      [](const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& offsets, const at::Tensor& buffer,
         double scale) { localsgd_ext::pack_into_generic(tensors, offsets, buffer, scale); },
      py::arg("tensors"), py::arg("offsets"), py::arg("buffer"), py::arg("scale") = 1.0);
  m.def(
      "_unpack_from_generic",
      [](const at::Tensor& buffer, const std::vector<int64_t>& offsets, double divisor,
         const std::vector<at::Tensor>& tensors) {
        localsgd_ext::unpack_from_generic(buffer, offsets, divisor, tensors);
      },
      py::arg("buffer"), py::arg("offsets"), py::arg("divisor"), py::arg("tensors"));

  localsgd_ext::bind_module_tree_snapshot(m);

  // Collectives wait in slices (interruptible_wait.h); between slices, Ctrl-C raises KeyboardInterrupt.
  localsgd_ext::set_interrupt_check([] {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
      throw py::error_already_set();
    }
  });

  m.def(
      "wait_interruptibly",
      [](const c10::intrusive_ptr<c10d::Work>& work, bool host_blocking) {
        localsgd_ext::wait_interruptibly(*work, host_blocking);
      },
      py::arg("work").none(false), py::arg("host_blocking"), py::call_guard<py::gil_scoped_release>(),
      "Waits for a torch.distributed Work in slices, so that Ctrl-C raises KeyboardInterrupt within about 0.1 s "
      "(host_blocking: the collective runs on host threads, as gloo's on CPU do).");
  m.def(
      "layout_fingerprint",
      [](const std::vector<at::Tensor>& tensors) { return localsgd_ext::layout_fingerprint(tensors); },
      py::arg("tensors"), "62-bit digest of the tensors' count, dtypes and shapes.");
  m.def(
      "content_fingerprints",
      [](const std::vector<at::Tensor>& tensors) { return localsgd_ext::content_fingerprints(tensors); },
      py::arg("tensors"), py::call_guard<py::gil_scoped_release>(), "62-bit digest of each tensor's bytes.");
  m.def("join_agreement_check_as_failed", &localsgd_ext::join_agreement_check_as_failed, py::arg("group").none(false),
        py::arg("status_device"), py::call_guard<py::gil_scoped_release>(),
        "Takes part in an averager's agreement check as a rank that failed to prepare.");

  py::class_<BucketedAverager>(m, "BucketedAverager")
      .def(py::init<std::vector<at::Tensor>, int64_t, int64_t, bool, std::optional<c10::ScalarType>,
                    std::vector<std::string>>(),
           py::arg("tensors"), py::arg("bucket_cap_bytes"), py::arg("buffers_in_flight") = 2,
           py::arg("zero_copy") = false, py::arg("comm_dtype") = py::none(),
           py::arg("names") = std::vector<std::string>())
      .def("average", &BucketedAverager::average, py::arg("group").none(false), py::arg("use_avg_op"),
           py::arg("status_device"), py::arg("check_finite"), py::arg("extra_fingerprint") = 0,
           py::arg("run_check") = true, py::call_guard<py::gil_scoped_release>())
      .def("ranks_agree", &BucketedAverager::ranks_agree, py::arg("group").none(false), py::arg("use_avg_op"),
           py::arg("status_device"), py::arg("check_finite"), py::arg("extra_fingerprint") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("fingerprint", &BucketedAverager::fingerprint, py::arg("use_avg_op") = false,
           py::arg("extra_fingerprint") = 0)
      .def("layout_fingerprint", [](const BucketedAverager& self) { return self.fingerprint(false, 0); })
      .def("start_delayed", &BucketedAverager::start_delayed, py::arg("group").none(false), py::arg("use_avg_op"),
           py::arg("status_device"), py::arg("check_finite"), py::arg("extra_fingerprint") = 0,
           py::call_guard<py::gil_scoped_release>())
      .def("finish_delayed", &BucketedAverager::finish_delayed, py::call_guard<py::gil_scoped_release>())
      .def("finish_delayed_into_mean", &BucketedAverager::finish_delayed_into_mean, py::arg("targets"),
           py::call_guard<py::gil_scoped_release>())
      .def("merge_delayed_targets", &BucketedAverager::merge_delayed_targets, py::arg("targets"),
           py::call_guard<py::gil_scoped_release>())
      .def("drain_delayed", &BucketedAverager::drain_delayed, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("delayed_pending", &BucketedAverager::delayed_pending)
      .def_property_readonly("delayed_bytes", &BucketedAverager::delayed_bytes)
      .def("local_error", &BucketedAverager::local_error)
      .def("rethrow_local_error", &BucketedAverager::rethrow_local_error)
      .def("first_nonfinite", &BucketedAverager::first_nonfinite, py::call_guard<py::gil_scoped_release>())
      .def("buckets", [](const BucketedAverager& self) { return buckets_to_list(self.buckets()); })
      .def_property_readonly("staging_bytes", &BucketedAverager::staging_bytes)
      .def_property_readonly("flat_bytes", &BucketedAverager::flat_bytes)
      .def_property_readonly("plans_built", &BucketedAverager::plans_built)
      .def("keep_flat", &BucketedAverager::keep_flat);
}
