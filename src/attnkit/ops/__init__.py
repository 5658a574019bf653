"""Pure functions on tensors: attention(), masks, backends."""
