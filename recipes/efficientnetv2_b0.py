"""efficientnetv2_b0: osteo's transfer-learning recipe (frozen head training, then fine-tuning).

    make train MODEL=efficientnetv2_b0                                  # ImageNet weights, phantom data
    make train MODEL=efficientnetv2_b0 DATA=/path/to/knees              # your own class folders
    make train MODEL=efficientnetv2_b0 WEIGHTS=none EPOCHS=2 IMAGE_SIZE=64   # smoke run, offline

What it is for: one row of the study's comparison, trained the way transfer learning
should be: 10 epochs with the backbone frozen (lr 1e-3), then 10 epochs with the whole
backbone unfrozen and BatchNorm kept frozen (lr 1e-5), balanced class weights,
cosine schedule, best checkpoint by validation macro F1. See
osteo.recipe.fine_tune_protocol.
"""

from osteo.recipe import Recipe, fine_tune_protocol


def recipe() -> Recipe:
    return fine_tune_protocol("efficientnetv2_b0")
