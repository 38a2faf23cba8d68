// Sliced waits on collectives, with the interrupt hook between slices.
#include "interruptible_wait.h"

#include <c10/util/Exception.h>

#include <utility>

namespace localsgd_ext {
namespace {

std::function<void()>& interrupt_check() {
  static std::function<void()> check;
  return check;
}

} // namespace

void set_interrupt_check(std::function<void()> check) { interrupt_check() = std::move(check); }

void wait_interruptibly(c10d::Work& work, bool host_blocking) {
  const std::function<void()>& check = interrupt_check();
  if (!host_blocking || !check) {
    work.wait();
    return;
  }
  for (;;) {
    try {
      // Work::wait(timeout) throws when the slice ends first; the collective carries on.
      work.wait(kInterruptPollInterval);
      return;
    } catch (const c10::Error&) {
      if (work.isCompleted()) {
        // It finished (or failed) around the end of the slice: a plain wait returns or throws its
        // own error, not the slice's.
        work.wait();
        return;
      }
    }
    check();
  }
}

} // namespace localsgd_ext
