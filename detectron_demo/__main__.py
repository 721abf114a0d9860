"""`python -m detectron_demo`: see detectron_demo/run.py."""

from .run import main

main()
