"""Model: the networks (one config key each) and the plans saved with the weights."""
