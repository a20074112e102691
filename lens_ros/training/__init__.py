"""Offline retraining: datasets, rewards, GRPO trainer, evaluation."""
