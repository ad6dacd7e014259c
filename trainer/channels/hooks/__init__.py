"""The hooks of the request-time tower models (one module per model): what `EmbeddingChannel` publishes besides the
vectors that `fit` sets (the served user tower, re-encoding) and the incremental-update hooks of `WarmTowerChannel`.
A model's channel class (trainer/channels/<model>.py) derives from its hooks class and writes `fit`."""
