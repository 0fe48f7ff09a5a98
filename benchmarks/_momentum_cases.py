"""Inputs of the momentum_update benchmarks: the parameter list of torchvision's ResNet-50, built by
hand (torchvision is not a dependency), and the implementations compared.

    resnet50_param_shapes()   161 shapes, 25,557,032 elements (torchvision.models.resnet50())
    make_params(shapes, dtype, device)  -> (target list, online list)
    implementations(...)      {name: step()} for time_interleaved
"""
import torch

import fastcontrast.momentum as fm

RESNET50_NUM_TENSORS = 161
RESNET50_NUM_ELEMENTS = 25_557_032


def resnet50_param_shapes():
    """Parameter shapes of torchvision's resnet50 in named_parameters() order."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1 weight and bias
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            width, out = planes, planes * 4
            shapes += [(width, inplanes, 1, 1), (width,), (width,),    # conv1, bn1
                       (width, width, 3, 3), (width,), (width,),       # conv2, bn2
                       (out, width, 1, 1), (out,), (out,)]             # conv3, bn3
            if b == 0:  # downsample: 1x1 conv + bn
                shapes += [(out, inplanes, 1, 1), (out,), (out,)]
            inplanes = out
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def make_params(shapes, dtype=torch.float32, device="cpu", online_dtype=None):
    """Random target and online tensors of the given shapes (online in online_dtype if given)."""
    online_dtype = online_dtype or dtype
    targets = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    onlines = [torch.randn(s, dtype=online_dtype, device=device) for s in shapes]
    return targets, onlines


def python_loop(targets, onlines, weight):
    """The plain baseline: one lerp_ per tensor."""
    with torch.no_grad():
        for t, o in zip(targets, onlines):
            t.lerp_(o, weight)


def implementations(targets, onlines, m, backends):
    """{name: zero-argument step} for the momentum update of targets towards onlines."""
    weight = 1.0 - m
    steps = {
        "python_loop_lerp_": lambda: python_loop(targets, onlines, weight),
        "torch._foreach_lerp_": lambda: torch._foreach_lerp_(targets, onlines, weight),
    }
    for backend in backends:
        steps[f"fastcontrast[{backend}]"] = (
            lambda b=backend: fm.momentum_update(targets, onlines, m, backend=b))
    return steps
