import sys

from align.cli import main

if __name__ == "__main__":  # guard: the vllm backend starts engine processes that re-import __main__
    sys.exit(main())
