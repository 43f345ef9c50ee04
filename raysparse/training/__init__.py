"""Training on Ray Train workers: batches, fine-tuning, pruning stages, distillation, evaluation."""
