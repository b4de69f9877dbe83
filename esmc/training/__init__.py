"""Training and evaluation of the shipped ``esmc-tiny`` model."""
