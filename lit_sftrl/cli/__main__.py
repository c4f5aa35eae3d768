"""``python -m lit_sftrl.cli``: the ``lit-sftrl`` command without its console script."""

from lit_sftrl.cli import main

main()
