"""Integrations with training stacks: import lift_kernels.integrations.hf (needs transformers)."""
