"""Pure loss functions of tensors: no models, no I/O, only torch."""
