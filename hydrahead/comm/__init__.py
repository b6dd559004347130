"""Communication: gradient compression hooks for the backbone's DDP exchange."""
