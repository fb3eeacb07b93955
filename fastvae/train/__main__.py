"""`python -m fastvae.train` (what torchrun runs) is fastvae-train."""

from fastvae.train.cli import main

main()
