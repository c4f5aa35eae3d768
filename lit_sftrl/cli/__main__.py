"""``python -m lit_sftrl.cli``: the same as the ``lit-sftrl`` console script."""

from lit_sftrl.cli import main

main()
