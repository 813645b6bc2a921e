"""appliance: cut one box into pinned slots and run StudioML experiments in them."""

__version__ = "0.1.0"
