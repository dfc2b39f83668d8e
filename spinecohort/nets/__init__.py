"""Neural networks used by spinecohort (plain PyTorch, no torchvision)."""
