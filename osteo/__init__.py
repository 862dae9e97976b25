"""osteo: train, compare and audit deep-learning classifiers of knee X-rays.

Three ordered classes: normal < osteopenia < osteoporosis.
"""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
