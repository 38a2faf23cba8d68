// The C++ tests' one assertion: EXPECT(cond) reports a failed condition and keeps going;
// finish_tests() turns the count into the exit status. No test framework to install.
#pragma once

#include <cstdio>

namespace localsgd_ext::testing {

inline int failures = 0;

inline int finish_tests(const char* suite) {
  if (failures != 0) {
    std::fprintf(stderr, "%s: %d expectation(s) failed\n", suite, failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", suite);
  return 0;
}

} // namespace localsgd_ext::testing

#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++::localsgd_ext::testing::failures;                                     \
    }                                                                          \
  } while (0)
