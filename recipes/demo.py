"""demo: the whole study on the built-in phantom, sized for a 2-core CPU.

    make demo                                   # phantom, the study's four backbones, report
    osteo train demo --model vgg16              # one of them

What it is for: showing the pipeline end to end without a GPU, a network or a
dataset. Weights none (no ImageNet download), so every backbone is trained from
scratch (phase 1 skipped: a frozen random backbone learns nothing) with BatchNorm
active, at 64 px on the phantom. Expected: each model's balanced accuracy at least
0.15 above the majority-class baseline on the validation split.
"""

from osteo.classifier import AugmentConfig
from osteo.recipe import DataConfig, ModelConfig, Recipe, TrainConfig


def recipe() -> Recipe:
    return Recipe(
        name="demo",
        data=DataConfig(dir="data/phantom", image_size=64, batch_size=32, phantom_n=900, phantom_size=128),
        model=ModelConfig(backbone="convnext_tiny", weights="none", freeze_bn=False,
                          augment=AugmentConfig(flip=True, zoom=0.05, shear=0.0)),
        train=TrainConfig(epochs=0, fine_tune_epochs=8, fine_tune_lr=1e-3, optimizer="adamw",
                          schedule="cosine", warmup_epochs=1, class_weight="balanced",
                          monitor="val_macro_f1", tensorboard=False),
    )
