"""FCN models on a trunk with named feature taps (VGG16 here; docs/PAPER.md, Network geometry).

Import order, no module importing a later one: state, upsample, trunk, weights, vgg, trunks, base,
fcn, fusion, transfer, build, torchfcn."""

from ..normalization import CAFFE, IMAGENET, Normalization, get_normalization
from .base import ARCHS, FCNSpec, SegmentationNet
from .build import build_fcn
from .fcn import FCN, FCNHead
from .fusion import LateFusionFCN, compose_late_fusion
from .state import model_state_dict
from .torchfcn import export_torchfcn, import_torchfcn
from .transfer import transfer_stage
from .trunk import GEOMETRIES, Tap, Trunk
from .trunks import BACKBONES, TRUNKS
from .upsample import bilinear_kernel, upsampler
from .vgg import VGG16Trunk, expand_input_channels
from .weights import PretrainedWeightsUnavailable

__all__ = [
    "ARCHS",
    "BACKBONES",
    "CAFFE",
    "FCN",
    "GEOMETRIES",
    "IMAGENET",
    "TRUNKS",
    "FCNHead",
    "FCNSpec",
    "LateFusionFCN",
    "Normalization",
    "PretrainedWeightsUnavailable",
    "SegmentationNet",
    "Tap",
    "Trunk",
    "VGG16Trunk",
    "bilinear_kernel",
    "build_fcn",
    "compose_late_fusion",
    "expand_input_channels",
    "export_torchfcn",
    "get_normalization",
    "import_torchfcn",
    "model_state_dict",
    "transfer_stage",
    "upsampler",
]
