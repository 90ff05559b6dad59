"""What review learns from decisions: the keeper model (training, predictions, retraining)."""
