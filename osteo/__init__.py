"""osteo: train, compare and audit deep-learning classifiers of knee X-rays.

Three ordered classes: normal < osteopenia < osteoporosis.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN notices, CPU feature lists) drowns the
# one-line errors and progress osteo prints; users can still override this.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
