"""Data-aware factors: input moments of conv layers and the whitening that fits to them.

A conv's output at one position is ``y[o] = sum_{h,w} W[o,:,h,w] . x_{h,w}`` over the input
patch. A kernel change ``dW`` changes it by ``sum_{h,w} dW[o,:,h,w] . x_{h,w}``; ignoring the
correlations between different spatial taps of a patch, its expected square over the data is
``sum_{o,h,w} dW[o,:,h,w]^T M dW[o,:,h,w]`` with ``M = E[x x^T]``, the ``(I, I)`` uncentred second
moment of the input channels over images and positions. With ``S = M^(1/2)`` (symmetric) that is
``||dW x_1 S||^2``, a plain Frobenius norm of the whitened kernel ``W x_1 S``: the weight-only
Tucker-2 / CP fit of ``W x_1 S``, with the input factor mapped back by ``S^-1``, minimises the
layer's output error instead of its kernel error (the response-reconstruction idea of Zhang et
al. 2015, "Accelerating very deep convolutional networks"; the whitening of SVD-LLM and ASVD).
``rl_mtd.factorize.tucker2`` / ``cp`` take ``input_moment=M`` for it.

``S`` is the root of ``M + WHITEN_RIDGE * tr(M) / I * Id``, so a rank-deficient moment (dead
ReLU channels, few images) stays invertible and directions the data never excites still keep a
small weight in the fit.

At load time this module imports nothing of rl_mtd but its errors (``rl_mtd.factorize`` imports
it; the conv lookup and the data loader are imported where they are used).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from rl_mtd.errors import RlMtdError

log = logging.getLogger(__name__)

# The ridge added to an input moment, relative to its mean eigenvalue.
WHITEN_RIDGE = 1e-3


def whitening(
    moment: torch.Tensor, n_in: int, *, ridge: float = WHITEN_RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)`` in float64 on the CPU, ``S = (M + ridge * tr(M) / I * Id)^(1/2)`` symmetric.

    ``moment`` is the ``(n_in, n_in)`` input moment ``M`` (symmetrised here; negative rounding
    in its eigenvalues is clipped to 0). An all-zero moment gives ``S = Id``: every fit is exact
    on zero inputs, so the weight-only one is as good as any.
    """
    if tuple(moment.shape) != (n_in, n_in):
        raise ValueError(
            f"the input moment has shape {tuple(moment.shape)}; a kernel with {n_in} input "
            f"channels needs ({n_in}, {n_in})"
        )
    m = moment.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError("the input moment holds NaN or inf values; the activations diverged")
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    vals = vals.clamp_min(0.0)
    trace = float(vals.sum())
    if not trace > 0.0:
        eye = torch.eye(n_in, dtype=torch.float64)
        return eye, eye.clone()
    root = (vals + ridge * trace / n_in).sqrt()
    return (vecs * root) @ vecs.T, (vecs / root) @ vecs.T


def _gram(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``sum x x^T`` over images and positions of ``(N, C, H, W)`` activations, float64 on the
    CPU, and how many positions it summed."""
    if x.dim() != 4:
        raise RlMtdError(
            f"input activations must be (N, C, H, W), got shape {tuple(x.shape)}; pass a batch "
            "of the layer's inputs"
        )
    # float64 on the device where it has it (MPS does not), summed on the CPU in float64.
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    flat = x.detach().to(dtype).transpose(0, 1).reshape(x.shape[1], -1)
    return (flat @ flat.T).to(device="cpu", dtype=torch.float64), flat.shape[1]


def input_moment(inputs: torch.Tensor) -> torch.Tensor:
    """The ``(C, C)`` uncentred second moment ``E[x x^T]`` of a batch of ``(N, C, H, W)`` input
    activations, averaged over images and positions; float64 on the CPU."""
    gram, count = _gram(inputs)
    if count == 0:
        raise RlMtdError("cannot take the input moment of an empty batch")
    return gram / count


def shrink_to_identity(moment: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - weight) * M + weight * tr(M) / I * Id``: the data-aware fit pulled towards the
    weight-only one (``weight`` 0 keeps ``M``; 1 gives a multiple of the identity, whose
    whitened fit is exactly the weight-only fit)."""
    if not 0.0 <= weight <= 1.0:
        raise RlMtdError(f"the shrinkage weight must be in [0, 1], got {weight}")
    n = moment.shape[0]
    scale = float(torch.diagonal(moment).sum()) / n
    eye = torch.eye(n, dtype=moment.dtype, device=moment.device)
    return (1.0 - weight) * moment + weight * scale * eye


def _image_batches(
    data: object, batch_size: int, seed: int, device: torch.device
) -> Iterable[torch.Tensor]:
    from rl_mtd.data import DeviceLoader, Split, channels_last_inputs

    if isinstance(data, Split):
        loader = DeviceLoader(
            data.to(device),
            batch_size,
            shuffle=True,
            seed=seed,
            channels_last=channels_last_inputs(device),
        )
        return (x for x, _ in loader)
    if isinstance(data, torch.Tensor):
        data = [data]
    return (b[0] if isinstance(b, tuple | list) else b for b in data)  # type: ignore[attr-defined]


@torch.no_grad()
def collect_input_moments(
    model: nn.Module,
    data: object,
    *,
    images: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The input moment of every conv of ``conv_layers(model)``, by name, from ``model``'s own
    activations in eval mode (float64 sums on the CPU).

    ``data`` is a ``rl_mtd.data.Split`` (a seeded random ``images`` of it, in batches of
    ``batch_size``) or an iterable of normalised image batches (tensors, or ``(x, y)`` pairs;
    the first ``images`` images when given). The model's mode is restored afterwards.
    """
    from rl_mtd.decompose import conv_layers

    if images is not None and images < 1:
        raise RlMtdError(f"images must be at least 1, got {images}")
    convs = conv_layers(model)
    sums = {
        name: torch.zeros(c.in_channels, c.in_channels, dtype=torch.float64) for name, c in convs
    }
    counts = dict.fromkeys(sums, 0)

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            gram, count = _gram(args[0])
            sums[name] += gram
            counts[name] += count

        return record

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    handles = [conv.register_forward_pre_hook(hook(name)) for name, conv in convs]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in _image_batches(data, batch_size, seed, device):
            if images is not None:
                batch = batch[: images - seen]
            if len(batch) == 0:
                continue
            model(batch.to(device=device, dtype=dtype))
            seen += len(batch)
            if images is not None and seen >= images:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise RlMtdError("no images to collect input moments from; pass a non-empty split")
    log.info("input moments of %d conv layers from %d images", len(convs), seen)
    return {name: sums[name] / max(counts[name], 1) for name in sums}
