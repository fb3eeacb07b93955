"""The importance-weighted bound (IWAE) on K samples per datapoint, with the IWAE or the DReG gradients."""
