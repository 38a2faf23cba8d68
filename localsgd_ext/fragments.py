"""Streaming DiLoCo's fragments (Douillard et al., 2025): the model's parameters split into contiguous
groups of about equal bytes, each synced every `local_sgd_steps` steps, in turn, so that a sync (and its
bandwidth and staging memory) happens every `local_sgd_steps / num_fragments` steps and carries one
fragment."""

from __future__ import annotations

import bisect
import itertools
from typing import List, Sequence

__all__ = ["fragment_bounds"]


def fragment_bounds(sizes_in_bytes: Sequence[int], num_fragments: int) -> List[int]:
    """The start index of each fragment and, last, `len(sizes_in_bytes)`: contiguous groups in the
    parameters' order, each non-empty, each cut where the running byte count comes closest to an equal
    share."""
    count = len(sizes_in_bytes)
    if count == 0 and num_fragments == 1:
        return [0, 0]  # a model without parameters: one empty fragment, nothing to average (as Accelerate)
    if num_fragments > count:
        raise ValueError(f"num_fragments must be at most the number of parameters ({count}), got num_fragments={num_fragments}")
    prefix = list(itertools.accumulate(sizes_in_bytes, initial=0))
    total = prefix[-1]
    bounds = [0]
    for k in range(1, num_fragments):
        target = total * k / num_fragments
        # The cut nearest the target, leaving each fragment before and after it at least one parameter.
        cut = bisect.bisect_left(prefix, target)
        if cut > 0 and target - prefix[cut - 1] <= prefix[min(cut, count)] - target:
            cut -= 1
        cut = max(bounds[-1] + 1, min(cut, count - (num_fragments - k)))
        bounds.append(cut)
    bounds.append(count)
    return bounds
