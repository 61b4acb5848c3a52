"""FCN models on a VGG16 trunk."""

from .fcn import ARCHS, FCN, FCNHead, FCNSpec, build_fcn
from .fusion import LateFusionFCN, compose_late_fusion
from .torchfcn import export_torchfcn, import_torchfcn
from .transfer import model_state_dict, transfer_stage
from .upsample import bilinear_kernel, upsampler
from .vgg import VGG16Trunk, expand_input_channels
from .weights import CAFFE, IMAGENET, Normalization, PretrainedWeightsUnavailable, get_normalization

__all__ = [
    "ARCHS",
    "CAFFE",
    "FCN",
    "IMAGENET",
    "FCNHead",
    "FCNSpec",
    "LateFusionFCN",
    "Normalization",
    "PretrainedWeightsUnavailable",
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
