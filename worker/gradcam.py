"""GradCAM whose gradient stops at the target layer.

The target layer's output is swapped for a detached leaf that requires grad, and the network's
parameters are frozen, so autograd records only the few operations after the target layer. The
backward pass therefore costs a fraction of a forward pass instead of a full backward through
the network, while the gradient at the target layer is exactly what a full backward would give.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from worker.timing import Stopwatch


class TargetActivation:
    """Capture a module's output as a gradient leaf for the duration of a ``with`` block."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.activation: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        return leaf

    def __enter__(self) -> "TargetActivation":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def cam_from(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Return GradCAM maps (N x H x W, float32, >= 0) from activations and their gradients."""
    weights = gradient.float().mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation.float()).sum(dim=1))


@dataclasses.dataclass
class CamPass:
    """One forward pass with GradCAM: logits, maps (N x h x w) and the classes explained.

    Read the timings once the results are back on the host: on a GPU they come from events.
    """

    logits: torch.Tensor
    cams: torch.Tensor
    class_index: torch.Tensor
    clock: Stopwatch

    @property
    def forward_ms(self) -> float:
        return self.clock.elapsed_ms(0, 1)

    @property
    def backward_ms(self) -> float:
        return self.clock.elapsed_ms(1, 2)


def forward_with_cam(network: nn.Module, target_layer: nn.Module, batch: torch.Tensor,
                     class_index: torch.Tensor | None = None) -> CamPass:
    """Run one forward pass and GradCAM for each image's ``class_index`` (top-1 when None).

    Call under whatever autocast context the device wants.
    """
    clock = Stopwatch(batch.device)
    clock.mark()
    with torch.enable_grad(), TargetActivation(target_layer) as target:
        logits = network(batch)
        if target.activation is None:
            raise RuntimeError("the GradCAM target layer did not run in the forward pass")
        if class_index is None:
            class_index = logits.detach().argmax(dim=1)
        clock.mark()
        # Images in a batch are independent in eval mode, so one backward of the summed
        # scores gives every image the gradient of its own class score.
        score = logits.gather(1, class_index[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, target.activation)
        cams = cam_from(target.activation.detach(), gradient)
    clock.mark()
    return CamPass(logits.detach(), cams, class_index, clock)
