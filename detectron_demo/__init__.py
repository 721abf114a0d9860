"""End-to-end detection benchmark of torchvision_cpu_ext (run: python -m detectron_demo)."""
