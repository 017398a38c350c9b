"""The network and what makes it a trained model: SmallCNN and the Classifier, batched inference,
calibration maps, and checkpoints (the one place that reads and writes them)."""
