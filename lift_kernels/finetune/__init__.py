"""lift-finetune: fine-tune a causal LM with LIFT from the command line (``python -m lift_kernels.finetune``)."""
