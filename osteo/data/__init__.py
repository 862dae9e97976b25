"""The data layer: phantom, decoding, audit, splits and the tf.data pipeline (TensorFlow-only)."""
