// Zero-copy mode's flat buffers: flatten, re-point detection, in-place all_reduce.
#include "flat_storage.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/zeros.h>

#include <utility>

#include "interruptible_wait.h"
#include "op_handles.h"

namespace localsgd_ext {

void FlatStorage::flatten(const AveragingPlan& plan) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  buffers_.clear();
  buffers_.reserve(plan.buckets.size());
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    const Bucket& bucket = plan.buckets[b];
    const BucketTensors& members = plan.members[b];
    // Zeroed: the padding between tensors is never written, so it averages zeros forever.
    at::Tensor flat = at::zeros({bucket.numel},
                                at::TensorOptions().dtype(plan.group_of(bucket).dtype).device(plan.device_of(bucket)));
    pack_op().call(members.tensors, members.offsets, flat, 1.0);
    for (size_t k = 0; k < members.tensors.size(); ++k) {
      at::Tensor t = members.tensors[k];
      t.set_data(flat.narrow(0, members.offsets[k], t.numel()).view(t.sizes()));
    }
    buffers_.push_back(std::move(flat));
  }
}

bool FlatStorage::broken(const AveragingPlan& plan) const {
  for (size_t b = 0; b < plan.buckets.size(); ++b) {
    const c10::StorageImpl* flat_storage = buffers_[b].storage().unsafeGetStorageImpl();
    const BucketTensors& members = plan.members[b];
    for (size_t k = 0; k < members.tensors.size(); ++k) {
      const at::Tensor& t = members.tensors[k];
      if (!t.has_storage() || t.storage().unsafeGetStorageImpl() != flat_storage ||
          t.storage_offset() != members.offsets[k] || !t.is_contiguous() ||
          t.scalar_type() != buffers_[b].scalar_type()) {
        return true;
      }
    }
  }
  return false;
}

int64_t FlatStorage::bytes() const {
  int64_t total = 0;
  for (const at::Tensor& flat : buffers_) {
    total += flat.numel() * static_cast<int64_t>(flat.element_size());
  }
  return total;
}

void FlatStorage::all_reduce(const c10::intrusive_ptr<c10d::ProcessGroup>& group, bool use_avg_op,
                             const AveragingPlan& plan) {
  c10d::AllreduceOptions options;
  options.reduceOp = use_avg_op ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
  // Nothing to overlap: every flat buffer goes on the wire at once, in place.
  std::vector<std::pair<c10::intrusive_ptr<c10d::Work>, bool>> works;
  works.reserve(buffers_.size());
  for (const at::Tensor& flat : buffers_) {
    if (flat.numel() > 0) {
      std::vector<at::Tensor> wire{flat};
      works.emplace_back(group->allreduce(wire, options), flat.is_cpu());
    }
  }
  for (const auto& [work, on_host] : works) {
    wait_interruptibly(*work, on_host);
  }
  if (!use_avg_op) {
    for (at::Tensor& flat : buffers_) {
      flat.div_(static_cast<double>(group->getSize()));
    }
  }
  for (const BucketTensors& members : plan.members) {
    bump_versions(members.tensors);
  }
}

} // namespace localsgd_ext
