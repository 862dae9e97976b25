"""demo: the whole study on the built-in phantom, sized for a 2-core CPU.

    make demo                                   # phantom, the study's four backbones, report
    osteo train demo --model vgg16              # one of them

What it is for: showing the pipeline end to end without a GPU, a network or a
dataset, in under 10 minutes on 2 CPU cores. Weights none (no ImageNet download), so
every backbone is trained from scratch: phase 1 is skipped (a frozen random backbone
learns nothing) and BatchNorm is active, with momentum 0.9 so its moving statistics
catch up within a few dozen steps. 900 phantom images of 96 px
(``data/phantom-demo``), 70/15/15 split (validation chooses, test reports), small inputs.

Per backbone, the learning rate, epochs and image size that learn within the budget
on the phantom (from-scratch ConvNeXt needs a far lower rate than Adam's default, and
a larger input than VGG: its stem downsamples by 4). Expected: every model's
balanced accuracy at least 0.15 above the majority-class baseline (1/3).

The sizes also give the report's Grad-CAM maps 8x8 cells: where the last stage is coarser
(VGG's is 2x2 at 32 px, DenseNet's and ConvNeXt's 2x2 at 64 px) osteo.explain reads the
deepest layer with at least 7x7, which is VGG's block 3 of 5 at 32 px and DenseNet's and
ConvNeXt's stage 2 of 4 at 64 px (at 32 and 48 px they were the first stage, 1x1 at the
end). VGG stays at 32 px: from scratch and without BatchNorm, VGG19 at 64 px learned
nothing in 3 epochs (balanced accuracy 0.33), and the deeper maps would cost 4x the time.
DenseNet and ConvNeXt at 64 px train at 74 and 60 images/s on a quiet 2-core AVX-512 CPU
(benchmarks/README.md): their 1,890 and 2,520 training images take about 25 and 45 s.
"""

from osteo.recipe import AugmentConfig, DataConfig, HeadConfig, ModelConfig, Recipe, TrainConfig

# backbone: (image size, epochs, peak learning rate, warm-up epochs)
PER_BACKBONE = {
    "vgg16": (32, 2, 1e-4, 0),
    "vgg19": (32, 2, 1e-4, 0),
    "densenet169": (64, 3, 1e-3, 0),
    "convnext_tiny": (64, 4, 2e-4, 1),
}


def recipe(backbone: str = "convnext_tiny") -> Recipe:
    size, epochs, lr, warmup = PER_BACKBONE.get(backbone, (48, 3, 3e-4, 0))
    return Recipe(
        name="demo",
        data=DataConfig(dir="data/phantom-demo", image_size=size, val=0.15, test=0.15, batch_size=32, phantom_n=900,
                        phantom_size=96),
        model=ModelConfig(backbone=backbone, weights="none", freeze_bn=False, bn_momentum=0.9,
                          head=HeadConfig(dropout=0.2),
                          augment=AugmentConfig(flip=True, zoom=0.05, shear=0.0)),
        train=TrainConfig(epochs=0, fine_tune_epochs=epochs, fine_tune_lr=lr, optimizer="adamw",
                          schedule="cosine", warmup_epochs=warmup, class_weight="balanced",
                          monitor="val_macro_f1", tensorboard=False),
    )
