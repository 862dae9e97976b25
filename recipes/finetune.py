"""finetune: osteo's transfer-learning recipe for any registered backbone.

    make train MODEL=densenet169                                  # ImageNet weights, phantom data
    make train MODEL=vgg16 DATA=/path/to/knees                    # your own class folders
    make train MODEL=convnext_tiny WEIGHTS=none EPOCHS=2 IMAGE_SIZE=64   # smoke run, offline
    osteo train finetune --model resnet50                         # the same, named

What it is for: one row of the study's comparison, trained the way transfer learning
should be: the study's protocol (frozen ImageNet backbone, GAP -> Dropout(0.5) ->
Dense(3), Adam, shear/zoom/flip), then 10 epochs with the whole backbone unfrozen and
BatchNorm kept frozen at a 100x lower rate (1e-5); 10 + 10 epochs, balanced class
weights (the public knee set is 780 / 374 / 793), a cosine schedule with one warm-up
epoch, a little rotation, and the best checkpoint by validation macro F1.
``recipe.json`` records it as ``finetune-<backbone>``.

Expected on real knee radiographs: balanced accuracy well above the majority-class
baseline (1/3); published models report 0.8-0.9 accuracy.
"""

from osteo.recipe import Recipe, fine_tune_protocol


def recipe(backbone: str = "convnext_tiny") -> Recipe:
    return fine_tune_protocol(backbone)
