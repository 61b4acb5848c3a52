"""FCN models on a trunk with named feature taps (VGG16, AlexNet, GoogLeNet; docs/PAPER.md,
Network geometry; docs/TRUNKS.md).

Import order, no module importing a later one: state, upsample, weights, trunk, vgg, alexnet,
googlenet, resnet, trunks, base, fcn, fusion, transfer, build, torchfcn, torchvision_fcn."""

from ..normalization import CAFFE, IMAGENET, Normalization, get_normalization
from .alexnet import AlexNetTrunk, alexnet_fc8_as_conv
from .base import ARCHS, FCNSpec, SegmentationNet
from .build import build_fcn
from .fcn import FCN, FCNHead
from .fusion import LateFusionFCN, compose_late_fusion
from .googlenet import GoogLeNetTrunk, googlenet_fc_as_conv
from .state import model_state_dict
from .torchfcn import export_torchfcn, import_torchfcn
from .torchvision_fcn import import_torchvision_fcn
from .transfer import transfer_stage
from .trunk import GEOMETRIES, Tap, Trunk, expand_input_channels, receptive_field
from .trunks import BACKBONES, TRUNKS
from .upsample import bilinear_kernel, upsampler
from .vgg import VGG16Trunk
from .weights import PretrainedWeightsUnavailable

__all__ = [
    "ARCHS", "BACKBONES", "CAFFE", "FCN", "GEOMETRIES", "IMAGENET", "TRUNKS",
    "AlexNetTrunk", "FCNHead", "FCNSpec", "GoogLeNetTrunk", "LateFusionFCN", "Normalization",
    "PretrainedWeightsUnavailable", "SegmentationNet", "Tap", "Trunk", "VGG16Trunk",
    "alexnet_fc8_as_conv", "bilinear_kernel", "build_fcn", "compose_late_fusion",
    "expand_input_channels", "export_torchfcn", "get_normalization", "googlenet_fc_as_conv",
    "import_torchfcn", "import_torchvision_fcn", "model_state_dict", "receptive_field", "transfer_stage", "upsampler"
]  # fmt: skip
