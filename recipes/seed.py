"""seed: the published study's exact protocol, with its bugs fixed.

    make train RECIPE=seed MODEL=vgg16
    make train RECIPE=seed MODEL=densenet169 DATA=/path/to/knees

What it is for: reproducing the study fairly. Frozen ImageNet backbone,
GAP -> Dropout(0.5) -> Dense(3), Adam at its default rate (1e-3), sparse categorical
cross-entropy, 25 epochs, 70/30 stratified split, shear/zoom/flip augmentation, one
checkpoint per run. What osteo fixes by construction: each backbone gets its own
preprocessing (the study fed VGG/DenseNet raw pixels and ConvNeXt [0, 1]),
augmentation runs in training only, the split is seeded, stratified and keeps
duplicates together (conflicting duplicates are excluded), the checkpoint is chosen by
macro F1 (not accuracy, which the majority class wins) and restored before evaluation.
Expected on real data: well above the 0.657 majority-class accuracy the study
reported; compare balanced accuracy with the baseline in the report.
"""

from osteo.recipe import Recipe, study_protocol


def recipe(backbone: str = "convnext_tiny") -> Recipe:
    return study_protocol(backbone)
