"""The papers' multiscale models as `imex_deq.nn.MultiscaleConfig` presets: experiment
configuration, kept out of `imex_deq.nn` (which holds the building blocks)."""

from ..nn import MultiscaleConfig


def mnist_conv() -> MultiscaleConfig:
    """Pal et al.'s MNIST conv model: branches 28 x 28 x 8 and 14 x 14 x 16, input
    28 x 28 x 1.

    The head walks down the branches like MDEQ's (28 -> 14 with a stride-2 conv, plus
    the second branch, then 14 -> 7 to 32 channels) and flattens the 7 x 7 x 32 map into
    the classifier, as a plain CNN of this size does: pooling there would throw away the
    spatial layout the classes differ by.
    """
    return MultiscaleConfig(
        channels=(8, 16),
        image_size=(28, 28),
        in_channels=1,
        expansion=1,
        head_final_channels=32,
        head_flatten=True,
    )


def cifar_small() -> MultiscaleConfig:
    """Pal et al.'s small CIFAR-10 model (MDEQ-TINY-like; ~164K parameters in the paper).

    2 branches of 24 channels at 32 x 32 and 16 x 16, expansion 5, dropout 0.25.
    The stem, cell (~112K) and Skip predictor (~58K) match the paper's code; the head
    walks down the branches as MDEQ's does (1x1 projections to 32 and 64 channels in
    place of its bottleneck blocks, a stride-2 3x3 conv, a 1x1 conv to 200, pooling).
    """
    return MultiscaleConfig(
        channels=(24, 24),
        image_size=(32, 32),
        expansion=5,
        dropout=0.25,
        head_channels=(32, 64),
        head_final_channels=200,
    )


def cifar_large() -> MultiscaleConfig:
    """Pal et al.'s large CIFAR-10 model (MDEQ-LARGE; ~10.6M parameters in the paper).

    4 branches of 32/64/128/256 channels, expansion 5, dropout 0.3. The cell
    (~8.7M) is MDEQ's; the head is MDEQ's with 1x1 projections in place of its
    bottleneck blocks (widths 56/112/224/448, stride-2 3x3 convs between them, a 1x1
    conv to 1024, pooling).
    """
    return MultiscaleConfig(
        channels=(32, 64, 128, 256),
        image_size=(32, 32),
        expansion=5,
        dropout=0.3,
        head_channels=(56, 112, 224, 448),
        head_final_channels=1024,
    )


def imagenet_small() -> MultiscaleConfig:
    """MDEQ-SMALL for ImageNet (~18M parameters in the papers).

    224 x 224 input; a 64-wide stem down-samples twice to 56 x 56; 4 branches of
    32/64/128/256 channels, expansion 5; 1000 classes. The cell is MDEQ's exactly; the
    head is MDEQ's with 1x1 projections (widths 96/192/384/768) in place of its
    bottleneck blocks, stride-2 3x3 convs between them, a 1x1 conv to 2048, pooling.
    """
    return MultiscaleConfig(
        channels=(32, 64, 128, 256),
        image_size=(224, 224),
        num_classes=1000,
        expansion=5,
        downsample_times=2,
        stem_channels=64,
        head_channels=(96, 192, 384, 768),
        head_final_channels=2048,
    )


PRESETS = {
    "conv": mnist_conv,
    "cifar-small": cifar_small,
    "cifar-large": cifar_large,
    "imagenet-small": imagenet_small,
}
"""Architecture name (as in `TrainConfig.architecture`) -> preset."""
