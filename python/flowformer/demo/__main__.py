"""`python -m flowformer.demo`: see flowformer.demo."""

from . import main

main()
