"""DiLoCo's outer step (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models"): the averaged parameters are not taken as they are; the difference between the
anchor (the parameters at the previous sync) and their average is treated as a gradient, an outer
optimizer steps the anchor with it, and the result becomes the parameters on every rank."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from .sharded import local_tensors

__all__ = ["OuterStep", "diloco_outer_optimizer"]

ANCHOR_DEVICES = ("device", "cpu")


def diloco_outer_optimizer(params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The paper's recipe: SGD with lr 0.7, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


OuterOptimizerOption = Union[None, str, Callable[[List[torch.Tensor]], torch.optim.Optimizer]]


def resolve_outer_optimizer(option: OuterOptimizerOption) -> Optional[Callable[[List[torch.Tensor]], torch.optim.Optimizer]]:
    if option is None:
        return None
    if isinstance(option, str):
        if option != "diloco":
            raise ValueError(f'outer_optimizer must be None, "diloco" or a callable, got {option!r}')
        return diloco_outer_optimizer
    if not callable(option) or isinstance(option, torch.optim.Optimizer):
        raise TypeError(
            'outer_optimizer must be None, "diloco", or a callable that builds an optimizer from a list of '
            f"tensors (e.g. functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)), got {option!r}"
        )
    return option


def check_anchor_device(anchor_device) -> str:
    if anchor_device not in ANCHOR_DEVICES:
        raise ValueError(f"outer_anchor_device must be one of {ANCHOR_DEVICES}, got {anchor_device!r}")
    return anchor_device


def _kind(tensor: torch.Tensor) -> str:
    return type(tensor).__name__ if type(tensor).__name__ == "DTensor" else "tensor"


class OuterStep:
    """The anchor and the outer optimizer over it. The anchor must start equal on every rank (as DDP
    makes the parameters at construction); every step is then the same computation on every rank, so
    the parameters leave each sync bit-identical."""

    def __init__(self, build_optimizer: Callable[[List[torch.Tensor]], torch.optim.Optimizer], anchor_device: str):
        self.build_optimizer = build_optimizer
        self.anchor_device = anchor_device
        self.anchors: Optional[List[torch.Tensor]] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def _anchor_device_for(self, param: torch.Tensor) -> torch.device:
        return param.device if self.anchor_device == "device" else torch.device("cpu")

    def _set_anchors(self, anchors: List[torch.Tensor]) -> None:
        self.anchors = anchors
        if not anchors:
            self.optimizer = None  # nothing to step (torch's optimizers refuse an empty list)
            return
        self.optimizer = self.build_optimizer(anchors)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"outer_optimizer must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}")

    def take_anchor(self, params: Sequence[torch.Tensor]) -> None:
        """Starts from the current parameters, unless an anchor exists already (a resumed run)."""
        if self.anchors is None:
            self._set_anchors([p.detach().to(self._anchor_device_for(p), copy=True) for p in params])
        else:
            self._check_matches(params)

    @torch.no_grad()
    def rebase(self, params: Sequence[torch.Tensor]) -> None:
        """Moves the anchor to the parameters' current values (the same on every rank, e.g. after a warm-up
        that DDP kept in step), keeping the outer optimizer's state."""
        anchors = self.anchor_slice()
        self._check_matches(params, anchors)
        for anchor, param in zip(anchors, params):
            anchor.copy_(param.detach())

    @torch.no_grad()
    def restore(self, params: Sequence[torch.Tensor], first: int = 0) -> None:
        """The inverse of `rebase`: parameters `first` onwards (a fragment) take their anchors' values, the
        last outer step's result (a sync that was not committed, as torchft's DiLoCo drops it)."""
        for param, anchor in zip(local_tensors(params), local_tensors(self.anchor_slice(first, len(params)))):
            param.copy_(anchor)

    def anchor_slice(self, first: int = 0, count: Optional[int] = None) -> List[torch.Tensor]:
        """The anchors of parameters `first` to `first + count` (a fragment; all of them by default)."""
        if self.anchors is None:
            raise RuntimeError("the outer step has no anchor yet: it is taken on enter (take_anchor)")
        return self.anchors[first:] if count is None else self.anchors[first : first + count]

    def _check_matches(self, params: Sequence[torch.Tensor], anchors: Optional[Sequence[torch.Tensor]] = None) -> None:
        anchors = self.anchor_slice() if anchors is None else anchors
        described = [(tuple(p.shape), p.dtype, _kind(p)) for p in params]
        anchored = [(tuple(a.shape), a.dtype, _kind(a)) for a in anchors]
        if described != anchored:
            if len(described) != len(anchored):
                difference = f"{len(params)} parameters now, {len(anchors)} anchored"
            else:
                i = next(i for i, (now, then) in enumerate(zip(described, anchored)) if now != then)
                difference = (
                    f"parameter {i} is now a {described[i][2]} of shape {list(described[i][0])} and "
                    f"{described[i][1]}, its anchor a {anchored[i][2]} of shape {list(anchored[i][0])} and {anchored[i][1]}"
                )
            raise RuntimeError(
                "outer_optimizer: the model's parameters no longer match the anchor taken from them "
                f"({difference}); the outer step cannot continue. Start a new LocalSGD for the new model."
            )

    @torch.no_grad()
    def apply(self, averaged: Sequence[torch.Tensor], first: int = 0, positions: Optional[Sequence[int]] = None) -> None:
        """`averaged` holds the means of the parameters from index `first` on (a fragment; all of them by
        default), or with `positions` of the parameters `first + positions[i]` (part of a fragment);
        afterwards it holds the outer optimizer's result, which is also their new anchor. The other
        anchors have no gradient, so the optimizer leaves them and their state alone."""
        if positions is None:
            anchors = self.anchor_slice(first, len(averaged))
        else:
            fragment = self.anchor_slice(first)
            anchors = [fragment[i] for i in positions]
        self._check_matches(averaged, anchors)
        if not anchors or self.optimizer is None:
            return
        for anchor, mean in zip(anchors, averaged):
            anchor.grad = anchor - mean.to(anchor.device)
        self.optimizer.step()
        for anchor, param in zip(anchors, averaged):
            param.copy_(anchor)
            anchor.grad = None

    def state_dict(self) -> dict:
        return {
            "anchors": None if self.anchors is None else [a.detach().cpu() for a in self.anchors],
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict, params: Sequence[torch.Tensor]) -> None:
        if state.get("anchors") is None:
            self.anchors = self.optimizer = None
            return
        self._set_anchors([a.to(self._anchor_device_for(p), copy=True) for a, p in zip(state["anchors"], params)])
        self._check_matches(params)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
