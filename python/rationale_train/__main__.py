"""``python -m rationale_train ...`` is ``rationale-train ...``."""

from .cli import main

if __name__ == "__main__":
    main()
