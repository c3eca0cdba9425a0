"""lift-finetune: fine-tune a causal LM with LIFT from the command line (``python -m lift_finetune``).

The application on top of the kernel library: it imports lift_kernels, never the other way round.
"""
