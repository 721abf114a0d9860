"""`python -m torchvision_cpu_ext.info`: prints torchvision_cpu_ext.info() for people."""

from torchvision_cpu_ext._info import format_info, info

if __name__ == "__main__":
    print(format_info(info()))
