"""What the commands other than ``run`` do, as library functions: prepare, merge, export, estimate,
generate, starter configs (``templates``) and the generated configuration reference (``reference``)."""
