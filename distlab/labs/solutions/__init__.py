"""Reference solutions of the labs, one module per notebook (ref<NN>.py). Kept out of the notebooks; the
test suite runs every exercise's check on them."""
