"""The inference form of a (compressed) model, and writing it as ONNX or TorchScript.

``inference_model(model)`` returns a new module that computes what ``model.eval()`` computes, to
float tolerance, with less work per image. What it changes, and why each change is exact:

- **BatchNorm folded.** Every ``BatchNorm2d`` that directly follows a conv in an
  ``nn.Sequential`` (a VGG's ``features``: conv, BatchNorm, ReLU) becomes a per-channel scale of
  that conv's kernel plus a bias, and is removed; after a decomposed block
  (``rl_mtd.decompose.DecomposedConv``) it folds into the block's last conv. Eval-mode BatchNorm
  is a per-channel affine map, so this is exact, and it saves a full pass over every activation.
- **Training-only modules removed.** Dropout (inert in eval mode) and the folded BatchNorms go;
  the other children of a Sequential keep their names, so a policy's layer names
  (``features.3``) still name the same layer, a conv or a ``DecomposedConv``.
- **ReLU after max-pooling.** ``ReLU, MaxPool2d`` becomes ``MaxPool2d, ReLU``: ReLU is
  monotone, so the max of the ReLUs is the ReLU of the max, and the ReLU then touches a quarter
  of the values.
- **Factor chains merged where merging is cheaper.** Consecutive convs with nothing between them
  (the parts of a Tucker-2 or CP block) compose into one conv. Only exact compositions are made:
  on each spatial axis at most one of the two convs may be more than pointwise (a ``kx1`` then a
  ``1xk`` is a ``kxk``; a ``1x1`` next to a ``kxk`` is a ``kxk``), and a conv with a bias is
  never merged into a later zero-padded conv (the padding would drop the bias at the borders).
  Two 3x3 convs are never merged: with zero padding their border outputs differ from one 5x5's.
  Two depthwise convs give a depthwise conv. Of all the ways to cut a chain into merged runs the
  cheapest by :func:`conv_cost` is taken: multiply-accumulates plus ``MEMORY_COST`` per
  activation value each conv reads or writes, because on a CPU a separate conv's pass over
  memory costs as much as many MACs. So a CP block's ``kx1`` and ``1xk`` depthwise convs always
  become one ``kxk`` depthwise conv (one pass over memory fewer, for 3 more cheap MACs per
  channel and pixel), a 1x1 with a handful of inputs folds into the conv next to it (the first
  layer's ``3 -> r`` projection), a Tucker-2 block near full rank becomes one plain conv, and a
  strongly compressed block stays factored (merging would multiply its MACs).
- **Layout and precision.** Weights are channels_last. On CUDA that is what tensor-core
  convolutions want; on the CPU it was measured fastest for compressed VGG16s at every batch
  size tried (1 to 64), and faster or within 1% for the original: oneDNN runs the few-channel
  factor convs of these blocks up to 50x faster in channels_last than in NCHW at batch 64, and
  whole compressed nets run 1.5x faster at batch 1 (BENCHMARKS.md, "Inference speed"). A conv
  whose weight is channels_last gives a channels_last output, so a plain NCHW input works
  unchanged. ``dtype`` (default float32) can make a CUDA model half or bfloat16.

``to_onnx`` and ``to_torchscript`` write the inference form atomically (temporary file, then
rename). ``to_onnx`` also zero-pads the channels inside factor chains to ONNX Runtime's channel
block (``rl_mtd.conv_pad``: exact; 1.6-1.9x faster there for uniform 37x VGG16s). ONNX export uses torch's
TorchScript-based exporter (``dynamo=False``), which needs only the ``onnx`` package;
``pip install "rl-mtd[export]"`` installs it with ``onnxruntime`` to run the file. (torch
2.9+'s default dynamo exporter would also need ``onnxscript``.)
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from rl_mtd.conv_merge import MEMORY_COST as MEMORY_COST  # re-exported
from rl_mtd.conv_merge import cheapest_merge
from rl_mtd.conv_merge import composable as composable  # re-exported
from rl_mtd.conv_merge import compose as compose  # re-exported
from rl_mtd.conv_merge import conv_cost as conv_cost  # re-exported
from rl_mtd.conv_pad import nchwc_block, pad_chains
from rl_mtd.data.loader import MEAN, STD
from rl_mtd.errors import RlMtdError
from rl_mtd.io import atomic_path
from rl_mtd.models import model_device

INPUT = {
    "layout": "N x 3 x H x W, RGB, float32",
    "scale": 1 / 255,
    "mean": list(MEAN),
    "std": list(STD),
    "formula": "(pixels / 255 - mean) / std, per channel",
}
"""What an exported model takes: images normalised as rl_mtd trains on them. ``to_onnx`` writes
it into the file's metadata (``preprocessing``), ``to_torchscript`` as the extra file
``preprocessing.json``, and the run's report.json beside the export."""

DEFAULT_OPSET = 17
"""ONNX opset of ``to_onnx``: supported by every onnxruntime release since 1.12."""

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


# ----------------------------------------------------------------------------- the public API


def inference_model(
    model: nn.Module,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = True,
    merge: bool = True,
    pad_channels: int = 1,
) -> nn.Module:
    """A new module for inference that gives ``model.eval()``'s outputs; ``model`` is unchanged.

    Args:
        model: any module; BatchNorms after convs in Sequentials and chains of convs (a VGG from
            ``rl_mtd.models.build_vgg``, compressed or not) are what gets folded and merged.
        device: where the result lives (default: where ``model``'s parameters are).
        dtype: floating-point type of the result (default float32; ``torch.half`` or
            ``torch.bfloat16`` trade accuracy for speed on a GPU). Inputs must have this dtype.
        channels_last: store conv weights channels_last (the default; measured fastest on the
            CPU, and what CUDA tensor cores want). ``False`` keeps NCHW.
        merge: merge factor chains where cheaper (``False``: fold and tidy only).
        pad_channels: zero-pad the channels inside factor chains to multiples of this
            (``rl_mtd.conv_pad.pad_chains``; exact). 1 (the default) pads nothing: in eager
            PyTorch on the CPU padding measured slightly slower; ONNX Runtime's blocked
            kernels (``to_onnx``) and tensor-core convs (multiples of 8 in half precision)
            want it.

    Returns:
        A deep copy in eval mode with BatchNorm folded, Dropout removed, ReLUs moved after
        max-pools, factor chains merged and gradients off. Folding and merging are computed in
        float64, then rounded once to ``dtype``.
    """
    device = torch.device(device) if device is not None else model_device(model)
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        out = _rewrite(out.to(device=device, dtype=torch.float64), merge=merge)
        pad_chains(out, pad_channels)
        out = out.to(dtype=dtype)
        if channels_last:
            out = out.to(memory_format=torch.channels_last)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


class CudaGraphed(nn.Module):
    """``module`` replayed from CUDA graphs: one captured per input shape and dtype, on first use.

    A pass of a small or decomposed network is bound by kernel launches at small batches (the
    37x VGG16 of issue 12 ran slower than the original on an H200 at batch 1); a graph launches
    the whole pass at once. Inputs are copied into the graph's static buffer; the output is a
    copy of its static output. Inference only (no autograd); the module must not change after
    capture.
    """

    def __init__(self, module: nn.Module, warmup: int = 3):
        super().__init__()
        device = model_device(module)
        if device.type != "cuda":
            raise RlMtdError(
                f"CUDA graphs need a module on a CUDA device; this one is on {device.type}"
            )
        self.module = module.eval()
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            with torch.inference_mode(False):  # a normal tensor: copy_ works in and out of it
                static_in = x.detach().clone()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch asks
                for _ in range(self.warmup):
                    self.module(static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.device(x.device), torch.cuda.graph(graph):  # on x's GPU, not cuda:0
                static_out = self.module(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    input_size: int = 32,
    pad_channels: int | None = None,
) -> Path:
    """Write ``inference_model(model)`` (float32, CPU; factor chains padded, see
    ``pad_channels``) to ``path`` as ONNX; return the path.

    Args:
        model: the model to export (left unchanged).
        path: the ``.onnx`` file to write (atomically; its directory is created).
        batch_size: batch of the example input used for tracing; the batch axis is dynamic, so
            the file runs at any batch size.
        opset: ONNX opset version (default ``DEFAULT_OPSET``).
        input_size: height and width of the example input (32 for CIFAR).
        pad_channels: zero-pad the channels inside factor chains to multiples of this
            (``rl_mtd.conv_pad``: exact; ONNX Runtime's blocked CPU kernels need it). Default:
            this CPU's block, ``rl_mtd.conv_pad.nchwc_block()`` (8, or 16 with AVX-512): the
            file is tuned for the CPU that writes it. Pass 16 for a file meant for AVX-512
            machines (it also runs blocked with AVX2, for more MACs), 1 for no padding.

    The graph's input is ``input`` (N x C x H x W, float32, normalised as ``INPUT`` says, which
    the file's metadata ``preprocessing`` repeats), its output ``logits``.
    Needs the ``onnx`` package (``pip install onnx``, or the ``export`` extra).
    """
    _require("onnx", "ONNX export")
    pad = nchwc_block() if pad_channels is None else pad_channels
    net = inference_model(model, device="cpu", channels_last=False, pad_channels=pad)
    example = _example_input(net, batch_size, input_size)
    # torch >= 2.5 has the dynamo exporter (the default from 2.9, needing onnxscript); ask for
    # the TorchScript-based one, which needs only onnx.
    legacy = (
        {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    )
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # It warns that it is deprecated; it is chosen on purpose (see above) and tested.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            **legacy,
        )
        import onnx

        graph = onnx.load(str(tmp))
        entry = graph.metadata_props.add()
        entry.key, entry.value = "preprocessing", json.dumps(INPUT)
        onnx.save(graph, str(tmp))
    return path


def to_torchscript(
    model: nn.Module, path: str | os.PathLike, *, batch_size: int = 1, input_size: int = 32
) -> Path:
    """Trace ``inference_model(model)`` (float32, CPU) and save it to ``path``; return the path.

    Args:
        model: the model to export (left unchanged).
        path: the ``.pt`` file to write (atomically); ``torch.jit.load(path)`` reads it back,
            and ``_extra_files={"preprocessing.json": ""}`` the normalisation it expects
            (``INPUT``).
        batch_size: batch of the example input used for tracing (the result runs at any batch).
        input_size: height and width of the example input (32 for CIFAR).
    """
    net = inference_model(model, device="cpu")
    example = _example_input(net, batch_size, input_size)
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.14 marks TorchScript deprecated in favour of torch.export; it still works and
        # is what the --export torchscript users load with torch.jit.load.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, (example,))
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={"preprocessing.json": json.dumps(INPUT)})
    return path


def _example_input(net: nn.Module, batch_size: int, input_size: int) -> torch.Tensor:
    """A random image batch with as many channels as ``net``'s first conv takes (3 if none)."""
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    return torch.randn(batch_size, channels, input_size, input_size)


def _require(package: str, what: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise RlMtdError(
            f"{what} needs the {package!r} package: pip install {package} "
            '(or pip install "rl-mtd[export]")'
        ) from None


# ----------------------------------------------------------------------------- rewriting


def _rewrite(module: nn.Module, *, merge: bool) -> nn.Module:
    """Fold, tidy and merge ``module``'s children (depth first); returns the replacement."""
    for name, child in list(module.named_children()):
        setattr(module, name, _rewrite(child, merge=merge))
    if isinstance(module, _DROPOUT):
        return nn.Identity()
    if isinstance(module, nn.Sequential):
        _fold_batchnorms(module)
        _drop_inert(module)
        _pool_before_relu(module)
        if merge:
            _merge_runs(module)
    return module


def _fold_batchnorms(seq: nn.Sequential) -> None:
    """Fold each BatchNorm2d that follows a conv (or a block ending in one) into that conv."""
    children = list(seq.named_children())
    for (_, before), (name, bn) in itertools.pairwise(children):
        conv = _last_conv(before)
        if isinstance(bn, nn.BatchNorm2d) and conv is not None and _foldable(conv, bn):
            fold_batchnorm(conv, bn)
            setattr(seq, name, nn.Identity())


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    """``module`` if a conv, else the last child of a Sequential chain when that is a conv."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module if isinstance(module, nn.Conv2d) else None


def _foldable(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    return bn.num_features == conv.out_channels and bn.running_mean is not None


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make ``conv`` compute ``bn(conv(x))`` of eval mode (in place; ``bn`` is unchanged)."""
    scale = torch.rsqrt(bn.running_var.to(conv.weight.dtype) + bn.eps)
    shift = -bn.running_mean.to(conv.weight.dtype) * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias * scale + shift)


def _drop_inert(seq: nn.Sequential) -> None:
    """Remove the Identity children of a Sequential; the others keep their names."""
    kept = OrderedDict((n, m) for n, m in seq.named_children() if not isinstance(m, nn.Identity))
    if 0 < len(kept) < len(seq):
        _set_children(seq, kept)


def _pool_before_relu(seq: nn.Sequential) -> None:
    """Swap each ReLU that a max-pool follows: the ReLU then touches a quarter of the values.

    Exact: ReLU is monotone, so the max of ReLUs is the ReLU of the max.
    """
    items = list(seq._modules.items())
    for i in range(len(items) - 1):
        (_, relu), (_, pool) = items[i], items[i + 1]
        if type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d:
            items[i], items[i + 1] = items[i + 1], items[i]
    if [n for n, _ in items] != list(seq._modules):
        _set_children(seq, OrderedDict(items))


def _set_children(seq: nn.Sequential, children: OrderedDict[str, nn.Module]) -> None:
    """Make ``children`` (name -> module, in forward order) the children of ``seq``."""
    for name in list(seq._modules):
        del seq._modules[name]
    for name, m in children.items():
        seq.add_module(name, m)


# ----------------------------------------------------------------------------- merging convs


def _merge_runs(seq: nn.Sequential) -> None:
    """Replace each run of consecutive convs in ``seq`` by its cheapest exact merging."""
    names = list(seq._modules)
    run: list[str] = []
    for name in [*names, None]:
        module = seq._modules.get(name) if name is not None else None
        if isinstance(module, nn.Conv2d):
            run.append(name)
            continue
        if len(run) > 1:
            _replace_run(seq, run)
        run = []


def _replace_run(seq: nn.Sequential, run: list[str]) -> None:
    convs = [seq._modules[n] for n in run]
    merged = cheapest_merge(convs)  # type: ignore[arg-type]
    if len(merged) == len(convs):
        return
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    names = iter(run)
    for name, module in seq._modules.items():
        if name not in run:
            kept[name] = module
        elif name == run[0]:
            kept.update((next(names), conv) for conv in merged)
    _set_children(seq, kept)
