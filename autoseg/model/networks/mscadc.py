"""`mscadc`: multi-scale context aggregation by dilated convolutions (Yu and Koltun 2016).

The idea it carries: a context module of dilated convs whose rates grow exponentially (1, 1, 2, 4, 8, 16,
then 1) aggregates context over an exponentially growing field while the map keeps its resolution and the
parameter count grows only linearly. The module has as many output channels as input channels and is
identity-initialised: each conv starts as the identity map (centre tap 1 from channel c to channel c, every
other weight and the bias 0), so an untrained module passes the front-end's features through unchanged and
training only has to learn what context adds (the paper found standard random init ineffective here).

How the planner's stage plan maps to it (torch module `autoseg.model.mscadc_net.MSCADC`):

* front-end: the plan's plain conv stages (kernels, features, 2 convs each: the paper's VGG-16 front-end
  with its last poolings removed), striding until the output stride 8 per axis and dilating instead from
  there on (`deeplab.atrous_plan`, `deeplab.stage_dilations`: the paper's front-end rule, which DeepLab
  shares). The topology keeps the plan's strides, so `total_stride` and the planned patch are the plan's;
  the network needs patches divisible by its output stride only.
* context module, the "basic" variant at C = the front-end's output channels (the deepest stage's
  features): constant width is what makes the identity init exact (the "large" variant's 2C ... 32C
  widths need the paper's scaled, noisy init and 32x the activations). 7 conv-nonlin layers with kernel 3
  on every axis whose deepest plan kernel is > 1 (1 elsewhere: such an axis stays 1) at the rates
  CONTEXT_RATES, each capped per axis so that its dilated kernel a(k - 1) + 1 fits in the smallest deepest
  map the planner leaves (MIN_MAP_EDGE x total stride / output stride voxels, `context_rates`; DeepLab's
  ASPP capping). No normalisation in the module (the paper has none: a norm would undo the identity).
* nonlinearity `relu` (stored in the topology; the paper's truncation max(., 0)): it is idempotent, so an
  identity-initialised layer after a ReLU front-end is exactly the identity. Normalisation of the
  front-end: `topology.norm`.
* a 1x1 classifier (the paper's layer 8) and (bi/tri)linear upsampling by the output stride; a single
  output (`deep_supervision=False`), `output_heads` is the classifier (interpolation keeps its prior).

Receptive field (`path`): every front-end conv at its stage's stride and dilation, the 7 context layers
with effective kernels a(k - 1) + 1, the classifier and the interpolation (2 taps at the low resolution).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from autoseg.model.contract import Topology
from autoseg.model.families import NetworkFamily, register
from autoseg.model.networks.deeplab import MIN_MAP_EDGE, atrous_plan, stage_dilations
from autoseg.model.networks.fcn import upsampling_path
from autoseg.model.receptive import Layer

Ints = tuple[int, ...]

#: The context module's dilation rates (Yu and Koltun 2016, table 1, layers 1-7).
CONTEXT_RATES = (1, 1, 2, 4, 8, 16, 1)
#: The context module's kernel edge on axes where the plan's deepest kernel is larger than 1.
CONTEXT_KERNEL = 3
#: The nonlinearity of the whole network (the paper's truncation; idempotent, see the module docstring).
RELU = "relu"


def build(topology: Topology, in_channels: int, num_classes: int) -> Any:
    from autoseg.model.mscadc_net import MSCADC

    return MSCADC(topology, in_channels, num_classes)


def topology(stage_plan: Topology) -> Topology:
    """The plan's kernels, strides, features and encoder convs; no decoder convs; ReLU."""
    return replace(stage_plan, convs_per_decoder_stage=(0,) * (stage_plan.n_stages - 1), nonlin=RELU)


def context_kernel(topology: Topology) -> Ints:
    """CONTEXT_KERNEL on every axis where the deepest stage's kernel is > 1, else 1."""
    return tuple(CONTEXT_KERNEL if k > 1 else 1 for k in topology.kernel_sizes[-1])


def context_rates(topology: Topology) -> list[Ints]:
    """Per context layer, the rate per axis: CONTEXT_RATES capped so that a(k - 1) + 1 taps fit in the
    smallest deepest map, MIN_MAP_EDGE x total stride / output stride voxels; 1 on 1-tap axes."""
    _, _, output = atrous_plan(topology)
    caps = []
    for total, o, k in zip(topology.total_stride, output, context_kernel(topology)):
        edge = MIN_MAP_EDGE * total // o
        caps.append(max(1, (edge - 1) // (k - 1)) if k > 1 else 1)
    return [tuple(min(rate, cap) for cap in caps) for rate in CONTEXT_RATES]


def frontend_path(topology: Topology) -> list[Layer]:
    """Every front-end conv at its stage's dilation, the first of each stage with the applied stride."""
    strides, _, _ = atrous_plan(topology)
    return [Layer(topology.kernel_sizes[s], stride=strides[s] if conv == 0 else None, dilation=dilation)
            for s, dilation in enumerate(stage_dilations(topology)) for conv in range(topology.convs_per_stage[s])]


def path(topology: Topology) -> list[Layer]:
    """Front-end, the context layers, the 1x1 classifier, the interpolation by the output stride."""
    _, _, output = atrous_plan(topology)
    kernel = context_kernel(topology)
    context = [Layer(kernel, dilation=rate) for rate in context_rates(topology)]
    return frontend_path(topology) + context + [Layer((1,) * topology.dim)] + upsampling_path(output)


FAMILY = register(NetworkFamily(
    name="mscadc",
    description="Multi-scale context aggregation: conv front-end to output stride 8 (dilated later stages), "
                "identity-initialised context module of dilated convs (rates 1-16), linear upsampling; "
                "a single output (Yu 2016)",
    build=build,
    topology=topology,
    path=path,
    deep_supervision=False,
    upsampling=False,
))
