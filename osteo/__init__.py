"""osteo: train, compare and audit deep-learning classifiers of knee X-rays.

Three ordered classes: normal < osteopenia < osteoporosis.
"""

from osteo import _quiet

# TensorFlow's C++ start-up chatter (oneDNN notices, CPU feature lists) would drown the
# one-line errors and progress osteo prints; `osteo --debug` or OSTEO_TF_LOGS=1 keep it.
_quiet.install()

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
