// Waiting for a collective in slices, so that Ctrl-C is not held up until the group's timeout
// (Accelerate's default is 30 minutes): between slices a hook, installed by the Python module, runs
// Python's pending signal handlers and throws if one raised (KeyboardInterrupt).
#pragma once

#include <torch/csrc/distributed/c10d/Work.hpp>

#include <chrono>
#include <functional>

namespace localsgd_ext {

// How long one slice blocks: the latency of an interrupt, not of the collective (a finished
// collective wakes the waiter at once).
constexpr std::chrono::milliseconds kInterruptPollInterval{100};

// Installed once by the bindings; without one, waits are plain blocking waits.
void set_interrupt_check(std::function<void()> check);

// Blocks until `work` completes and rethrows its error, if any. `host_blocking`: the collective runs on
// host threads (gloo on CPU) and wait() blocks the caller; otherwise (NCCL) wait() only orders
// streams and returns at once, and is called as it is.
void wait_interruptibly(c10d::Work& work, bool host_blocking);

} // namespace localsgd_ext
