"""Using a model in production: batch scoring for scheduled jobs (predict) and exports (TorchScript,
ONNX)."""
